//! Checks on the shape of the source tree that review alone lets slip: no
//! top-level module imports one that imports it back (directly or round a
//! longer loop), and no file grows past 500 lines unless its first comment
//! says why.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const MAX_LINES: usize = 500;
/// What a longer file's first comment must say (with its reason after).
const LONG_FILE_NOTE: &str = "Longer than 500 lines:";

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read agent/src") {
        let path = entry.expect("read a directory entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`route/health.rs` -> `route`);
/// None for the crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The code of a file without its comments and its unit tests (tests may
/// reach anywhere).
fn code_of(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names: `crate::x` anywhere, and the first
/// segment of each item in a `use crate::{...}` group.
fn modules_named(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut named = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        named.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            named.insert(ident(rest));
        }
    }
    named
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        // Unit tests in files of their own may reach anywhere.
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = code_of(&fs::read_to_string(file).expect("read a source file"));
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(modules_named(&code).into_iter().filter(|m| *m != module));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

/// A loop of imports, if there is one: depth-first search for a back edge.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        node: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(graph, start, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = module_graph();
    // The check must see the tree: these edges exist for sure.
    assert!(graph["proxy"].contains("route"), "{graph:?}");
    assert!(graph["catalog"].contains("config"), "{graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "modules import each other in a loop: {}; move the item one side \
             needs to the lower module, or to a leaf of its own",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_finder_finds_a_loop() {
    let edges = |list: &[(&str, &[&str])]| -> BTreeMap<String, BTreeSet<String>> {
        list.iter()
            .map(|(a, bs)| (a.to_string(), bs.iter().map(|b| b.to_string()).collect()))
            .collect()
    };
    let acyclic = edges(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])]);
    assert_eq!(find_cycle(&acyclic), None);
    let looped = edges(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
    assert_eq!(
        find_cycle(&looped).map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_owned())
    );
    let code = "use crate::{\n    catalog::{Service, x::Y},\n    clock::now_ms,\n};\nfn f() { crate::route::choose(); }";
    assert_eq!(
        modules_named(code).into_iter().collect::<Vec<_>>(),
        ["catalog", "clock", "route"]
    );
}

#[test]
fn no_file_is_longer_than_500_lines_without_saying_why() {
    let src = src_dir();
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut long = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("read a source file");
        let lines = text.lines().count();
        let first_comment: String = text
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        if lines > MAX_LINES && !first_comment.contains(LONG_FILE_NOTE) {
            long.push(format!(
                "{} ({lines} lines)",
                file.strip_prefix(&src).unwrap_or(&file).display()
            ));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines whose first comment does not say why \
         (\"{LONG_FILE_NOTE} ...\"): split them, or say why: {}",
        long.join(", ")
    );
}

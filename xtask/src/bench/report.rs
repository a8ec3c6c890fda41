//! The bench's report: a Markdown table, a JSON file and an SVG plot of
//! the latency distributions, under target/bench/.

use std::{fmt::Write as _, path::Path};

use anyhow::bail;
use serde_json::{Value, json};

use super::Route;

/// One line about a single measurement, for the progress log.
pub fn brief(workload: &str, v: &Value) -> String {
    match workload {
        "latency" => format!(
            "p50 {}us p99 {}us p99.9 {}us ({} requests, {} errors)",
            v["p50_us"], v["p99_us"], v["p999_us"], v["requests"], v["errors"]
        ),
        "throughput" => format!("{:.0} req/s", v["rps"].as_f64().unwrap_or(0.0)),
        "hol" => format!(
            "latency p99 {}us alone, {}us beside a bulk transfer of {:.0} MB/s",
            v["alone_p99_us"],
            v["beside_bulk_p99_us"],
            v["bulk_mb_per_s"].as_f64().unwrap_or(0.0)
        ),
        "churn" => format!("{:.0} conn/s", v["cps"].as_f64().unwrap_or(0.0)),
        "memory" => {
            let per_agent: Vec<String> = v["bytes_per_connection_per_agent"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{:.0}", b.as_f64().unwrap_or(0.0)))
                .collect();
            format!(
                "{:.0} B per idle connection ({} connections){}",
                v["bytes_per_connection"].as_f64().unwrap_or(0.0),
                v["connections"],
                if per_agent.len() > 1 {
                    format!("; each agent: {} B", per_agent.join(" B, "))
                } else {
                    String::new()
                }
            )
        }
        _ => v.to_string(),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Median over rounds of one field of one workload on one path.
fn med(results: &[(Route, &str, Value)], path: Route, workload: &str, field: &str) -> f64 {
    median(
        results
            .iter()
            .filter(|(p, w, _)| *p == path && *w == workload)
            .filter_map(|(_, _, v)| v[field].as_f64())
            .collect(),
    )
}

/// Proxy CPU per request (µs), median over rounds.
fn cpu_per_request(results: &[(Route, &str, Value)], path: Route) -> f64 {
    median(
        results
            .iter()
            .filter(|(p, w, _)| *p == path && *w == "throughput")
            .filter_map(|(_, _, v)| {
                let reqs = v["requests"].as_f64()?;
                Some(v["proxy_cpu_seconds"].as_f64()? * 1e6 / reqs.max(1.0))
            })
            .collect(),
    )
}

/// The median CPU per request of each of a path's agents (one figure per
/// node on a two-node path).
fn cpu_per_request_per_agent(results: &[(Route, &str, Value)], path: Route) -> Vec<f64> {
    let runs: Vec<(f64, Vec<f64>)> = results
        .iter()
        .filter(|(p, w, _)| *p == path && *w == "throughput")
        .filter_map(|(_, _, v)| {
            let reqs = v["requests"].as_f64()?.max(1.0);
            let each = v["proxy_cpu_seconds_per_agent"].as_array()?;
            Some((reqs, each.iter().filter_map(Value::as_f64).collect()))
        })
        .collect();
    let agents = runs.iter().map(|(_, each)| each.len()).max().unwrap_or(0);
    (0..agents)
        .map(|i| {
            median(
                runs.iter()
                    .filter_map(|(reqs, each)| Some(each.get(i)? * 1e6 / reqs))
                    .collect(),
            )
        })
        .collect()
}

fn fmt(x: f64, decimals: usize) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else {
        format!("{x:.decimals$}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".to_owned()
    } else {
        format!("{:.2}", a / b)
    }
}

/// Writes results.md, results.json and latency.svg; returns the Markdown.
pub fn write(
    dir: &Path,
    results: &[(Route, &str, Value)],
    quick: bool,
    haltpoll: &str,
) -> anyhow::Result<String> {
    let d = Route::Direct;
    let h = Route::Haproxy;
    let mut md = String::new();
    writeln!(
        md,
        "## Sluice bench ({}; 1 KiB request/response; proxies on CPU 0 with one worker, load and backend on CPU 1; {haltpoll})\n",
        if quick {
            "quick smoke run: figures are not meaningful"
        } else {
            "full run"
        }
    )?;
    writeln!(
        md,
        "| path | p50 us | p90 us | p99 us | p99.9 us | p99 added over direct us | p99 added / HAProxy's | req/s at 64 conns | / direct | / HAProxy | proxy CPU us/req | conn/s (churn) | / HAProxy | memory B/idle conn |"
    )?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let added = |p| med(results, p, "latency", "p99_us") - med(results, d, "latency", "p99_us");
    let mut json_rows = Vec::new();
    for p in Route::ALL {
        let row = json!({
            "path": p.name(),
            "p50_us": med(results, p, "latency", "p50_us"),
            "p90_us": med(results, p, "latency", "p90_us"),
            "p99_us": med(results, p, "latency", "p99_us"),
            "p999_us": med(results, p, "latency", "p999_us"),
            "p99_added_us": added(p),
            "rps": med(results, p, "throughput", "rps"),
            "proxy_cpu_us_per_request": cpu_per_request(results, p),
            "cps": med(results, p, "churn", "cps"),
            "memory_bytes_per_idle_connection": med(results, p, "memory", "bytes_per_connection"),
        });
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.name(),
            fmt(f("p50_us"), 0),
            fmt(f("p90_us"), 0),
            fmt(f("p99_us"), 0),
            fmt(f("p999_us"), 0),
            if p == d {
                "-".into()
            } else {
                fmt(f("p99_added_us"), 0)
            },
            if p == d {
                "-".into()
            } else {
                ratio(added(p), added(h))
            },
            fmt(f("rps"), 0),
            ratio(f("rps"), med(results, d, "throughput", "rps")),
            ratio(f("rps"), med(results, h, "throughput", "rps")),
            if p == d || p == Route::SluiceKernel {
                "-".into()
            } else {
                fmt(f("proxy_cpu_us_per_request"), 1)
            },
            fmt(f("cps"), 0),
            ratio(f("cps"), med(results, h, "churn", "cps")),
            fmt(f("memory_bytes_per_idle_connection"), 0),
        )?;
        json_rows.push(row);
    }
    let k = Route::SluiceKernel;
    writeln!(
        md,
        "\nKernel mode against direct (target: within 3%): p50 {}, p99 {}; throughput {}; churn {}.",
        ratio(
            med(results, k, "latency", "p50_us"),
            med(results, d, "latency", "p50_us")
        ),
        ratio(
            med(results, k, "latency", "p99_us"),
            med(results, d, "latency", "p99_us")
        ),
        ratio(
            med(results, k, "throughput", "rps"),
            med(results, d, "throughput", "rps")
        ),
        ratio(
            med(results, k, "churn", "cps"),
            med(results, d, "churn", "cps")
        ),
    )?;
    let (b, sm) = (Route::Sluice, Route::SluiceSockmap);
    writeln!(
        md,
        "Sockmap bypass against the plain proxy path: p50 {}, p99 {}; throughput {}; proxy CPU per request {}.",
        ratio(
            med(results, sm, "latency", "p50_us"),
            med(results, b, "latency", "p50_us")
        ),
        ratio(
            med(results, sm, "latency", "p99_us"),
            med(results, b, "latency", "p99_us")
        ),
        ratio(
            med(results, sm, "throughput", "rps"),
            med(results, b, "throughput", "rps")
        ),
        ratio(cpu_per_request(results, sm), cpu_per_request(results, b)),
    )?;
    let (m, t) = (Route::SluiceMtls, Route::SluiceTunnel);
    let added =
        |p: Route| med(results, p, "latency", "p99_us") - med(results, d, "latency", "p99_us");
    let memory = med(results, t, "memory", "bytes_per_connection");
    let largest = med(results, t, "memory", "largest_agent_bytes_per_connection");
    writeln!(
        md,
        "mTLS in tunnels against the plain proxy path (targets: churn 0.8, throughput 0.9, p99 added 1.5 at most, memory 4 KiB in each agent): churn {}, throughput {}, p99 added {}, memory {} B in the larger agent ({} B both); per-connection mTLS: churn {}, throughput {}, p99 added {}.",
        ratio(
            med(results, t, "churn", "cps"),
            med(results, b, "churn", "cps")
        ),
        ratio(
            med(results, t, "throughput", "rps"),
            med(results, b, "throughput", "rps")
        ),
        ratio(added(t), added(b)),
        fmt(largest, 0),
        fmt(memory, 0),
        ratio(
            med(results, m, "churn", "cps"),
            med(results, b, "churn", "cps")
        ),
        ratio(
            med(results, m, "throughput", "rps"),
            med(results, b, "throughput", "rps")
        ),
        ratio(added(m), added(b)),
    )?;
    let per_node = |p: Route| {
        let each: Vec<String> = cpu_per_request_per_agent(results, p)
            .iter()
            .map(|us| fmt(*us, 1))
            .collect();
        each.join(" and ")
    };
    writeln!(
        md,
        "CPU per request on each node (calling, called), keep-alive workload: tunnels {} us, per-connection mTLS {} us; the plain proxy path's one agent {} us.",
        per_node(t),
        per_node(m),
        fmt(cpu_per_request(results, b), 1),
    )?;
    let one = med(
        results,
        Route::SluiceTunnelOne,
        "memory",
        "bytes_per_connection",
    );
    if !one.is_nan() && !memory.is_nan() {
        writeln!(
            md,
            "A pool connection (both ends) costs about {:.0} B: memory per idle connection with one stream per pool connection ({one:.0} B) less that with 100 ({memory:.0} B), times 100/99.",
            (one - memory) * 100.0 / 99.0
        )?;
    }
    // Each round's latency beside bulk over its latency alone, measured
    // back to back; the median of those.
    let hol_ratio = |p: Route| {
        median(
            results
                .iter()
                .filter(|(q, w, _)| *q == p && *w == "hol")
                .filter_map(|(_, _, v)| {
                    Some(v["beside_bulk_p99_us"].as_f64()? / v["alone_p99_us"].as_f64()?)
                })
                .collect(),
        )
    };
    for p in [d, b, m, t] {
        let alone = med(results, p, "hol", "alone_p99_us");
        if alone.is_nan() {
            continue;
        }
        writeln!(
            md,
            "Head-of-line on {} (target for tunnels: p99 beside bulk within 2x of alone), medians over rounds: latency p99 {} us alone, {} us beside a bulk transfer of {} MB/s; {}x (the median of each round's ratio).",
            p.name(),
            fmt(alone, 0),
            fmt(med(results, p, "hol", "beside_bulk_p99_us"), 0),
            fmt(med(results, p, "hol", "bulk_mb_per_s"), 0),
            fmt(hol_ratio(p), 2),
        )?;
    }
    // The bulk loads the core the agents share whatever carries it; per
    // connection, it has a TCP connection of its own, so the difference
    // between the two is what sharing a pool connection adds. The plain
    // path's one agent, with no TLS, shows what the load on the core does
    // by itself.
    let beside = |p: Route| med(results, p, "hol", "beside_bulk_p99_us");
    if !beside(t).is_nan() && !beside(m).is_nan() {
        writeln!(
            md,
            "Beside the same bulk transfer, the latency p99 in tunnels is {}x that of per-connection mTLS, where the bulk has a connection of its own: what sharing a pool connection adds beyond the load on the core. On the plain proxy path, the latency p99 beside the same bulk is {}x its p99 alone: what that load does with no TLS and no shared connection.",
            ratio(beside(t), beside(m)),
            fmt(hol_ratio(b), 2),
        )?;
    }
    writeln!(
        md,
        "\nLatency is open-loop at a fixed rate and counted from when each request was due (coordinated-omission corrected). \
         Tails (p99.9, max) are dominated by this machine's periodic stalls; compare paths at p50-p99, within this run."
    )?;
    std::fs::write(dir.join("results.md"), &md)?;
    let raw: Vec<Value> = results
        .iter()
        .map(|(p, w, v)| json!({"path": p.name(), "workload": w, "result": v}))
        .collect();
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json!({
            "quick": quick,
            "haltpoll": haltpoll,
            "summary": json_rows,
            "runs": raw,
        }))?,
    )?;
    std::fs::write(dir.join("latency.svg"), svg(results))?;
    Ok(md)
}

/// Latency by quantile, one line per path, log scales; the first round.
fn svg(results: &[(Route, &str, Value)]) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 520.0, 80.0, 170.0, 40.0, 60.0);
    let colors = [
        "#444444", "#1f77b4", "#9467bd", "#17becf", "#2ca02c", "#8c564b", "#d62728", "#ff7f0e",
    ];
    // x: "nines" of the quantile, 0 (p0) .. 4 (p99.99); y: log10 of µs.
    let nines = |q: f64| (-(1.0 - q).max(1e-4).log10()).min(4.0);
    let curves: Vec<(Route, Vec<(f64, f64)>)> = Route::ALL
        .iter()
        .filter_map(|p| {
            let v = results.iter().find(|(q, w, _)| q == p && *w == "latency")?;
            let pts = v.2["quantiles"]
                .as_array()?
                .iter()
                .filter_map(|pair| Some((pair[0].as_f64()?, pair[1].as_f64()?)))
                .filter(|(q, _)| *q < 1.0)
                .map(|(q, us)| (nines(q), us.max(1.0).log10()))
                .collect();
            Some((*p, pts))
        })
        .collect();
    let ymax = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(2.0f64, f64::max)
        .ceil();
    let ymin = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(ymax, f64::min)
        .floor();
    let sx = |x: f64| left + x / 4.0 * (w - left - right);
    let sy = |y: f64| top + (ymax - y) / (ymax - ymin).max(1.0) * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" font-size=\"15\">Latency by percentile, 1 KiB request/response (log scales)</text>\n",
        left
    );
    for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99"].iter().enumerate() {
        let x = sx(i as f64);
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            h - bottom,
            h - bottom + 18.0
        );
    }
    let mut y = ymin;
    while y <= ymax {
        let py = sy(y);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} us</text>",
            w - right,
            left - 6.0,
            py + 4.0,
            10f64.powf(y)
        );
        y += 1.0;
    }
    for (i, (p, pts)) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            path.join(" "),
            w - right + 16.0,
            top + 20.0 * i as f64 + 6.0,
            w - right + 36.0,
            top + 20.0 * i as f64 + 12.0,
            p.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The smoke check: every path carried traffic in every workload.
pub fn check_every_path_carried_traffic(results: &[(Route, &str, Value)]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (p, w, v) in results {
        let ok = match *w {
            "latency" => v["requests"].as_u64() > Some(0) && v["errors"].as_u64() == Some(0),
            "throughput" => v["rps"].as_f64() > Some(0.0),
            "churn" => v["cps"].as_f64() > Some(0.0),
            "memory" => v["rss_after_kib"].as_u64() > Some(0),
            _ => true,
        };
        if !ok {
            problems.push(format!("{} {w}: {v}", p.name()));
        }
    }
    if problems.is_empty() {
        println!("bench: every path carried traffic in every workload");
        Ok(())
    } else {
        bail!("paths that carried no traffic:\n{}", problems.join("\n"))
    }
}

//! A fake Kubernetes API server for the discovery tests. No real API server
//! can run here, so this one speaks the same wire format over plain HTTP/1.1
//! on loopback: lists, chunked watch streams that resume from a
//! resourceVersion, bookmarks, streaming lists, 410 expiry, abrupt cuts and
//! RBAC refusals. Tests drive it (`set_object`, `delete_object`, ...) and the
//! agent under test reaches it through the kubeconfig it writes.
//!
//! Shapes follow the Kubernetes 1.30 API reference and "API Concepts"
//! (efficient detection of changes, watch bookmarks, streaming lists).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The identity every refusal names, as the agent's DaemonSet runs.
const USER: &str = "system:serviceaccount:sluice-system:sluice";

/// The collections the agent discovers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Pods,
    Namespaces,
    /// Sluice's own custom resource (config/kubernetes/policy-crd.yaml).
    Policies,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Pods,
        Resource::Namespaces,
        Resource::Policies,
    ];

    /// The resource whose objects have this `kind`.
    pub fn of_kind(kind: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.kind() == kind)
    }

    pub fn plural(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::Policies => "sluicepolicies",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::Policies => "SluicePolicy",
        }
    }

    /// The API group; the core group is "".
    fn group(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io",
            Resource::Policies => "sluice.io",
            _ => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::Policies => "sluice.io/v1alpha1",
            _ => "v1",
        }
    }

    /// `/api/v1` or `/apis/GROUP/VERSION`: what every path of the resource
    /// starts with.
    fn base(self) -> String {
        match self.group() {
            "" => "/api/v1".to_owned(),
            _ => format!("/apis/{}", self.api_version()),
        }
    }

    /// The cluster-wide collection, as `Api::all` asks for it.
    pub fn path(self) -> String {
        format!("{}/{}", self.base(), self.plural())
    }

    fn namespaced(self) -> bool {
        self != Resource::Namespaces
    }

    fn index(self) -> usize {
        self as usize
    }

    /// `pods`, or `endpointslices.discovery.k8s.io` outside the core group,
    /// as the API server names a resource in its messages.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }
}

/// Reads `tests/fixtures/kube/NAME`.
pub fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kube")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of a resource's history, in the order the test made it.
/// Bookmarks, expiry and cuts are in the same log as changes so that an open
/// watch sees them in exactly the order they happened.
enum Entry {
    Change {
        rv: u64,
        kind: ChangeKind,
        object: Value,
        /// The state before a modification: a watch with a field selector
        /// needs it to tell an object entering its selection from one leaving.
        previous: Option<Value>,
    },
    Bookmark {
        rv: u64,
    },
    Expire {
        rv: u64,
    },
    Cut,
}

#[derive(Default)]
struct Store {
    /// Current objects by `namespace/name` (or `name`), in the API server's
    /// key order, so lists come out sorted the way etcd returns them.
    objects: BTreeMap<String, Value>,
    log: Vec<Entry>,
    /// A watch from an older resourceVersion is answered 410 Gone, as after
    /// an etcd compaction.
    oldest_rv: u64,
    /// Verbs answered 403 ("*" for all).
    denied: HashSet<String>,
    open_watches: usize,
}

struct State {
    /// The cluster-wide resourceVersion, like etcd's revision: every write to
    /// any resource moves it forward.
    revision: u64,
    stores: [Store; 5],
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every log entry and on stop, to wake watch streams.
    changed: Condvar,
    stop: AtomicBool,
    /// Every open connection, so Drop can shut them down and unblock their
    /// threads.
    conns: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    addr: SocketAddr,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// A poisoned lock only means another test thread panicked; the data is
/// still consistent for our purposes.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fake API server on 127.0.0.1, stopped when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts serving on an ephemeral port of 127.0.0.1.
    pub fn start() -> FakeApiServer {
        Self::start_on("127.0.0.1:0".parse().expect("loopback address"))
    }

    /// Like [`Self::start`], listening on `addr` (e.g. 0.0.0.0:0 in a node's
    /// namespace, so that another node reaches it too).
    pub fn start_on(addr: std::net::SocketAddr) -> FakeApiServer {
        let listener = TcpListener::bind(addr).expect("bind fake API server");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                // A young cluster's etcd is already a few hundred revisions in.
                revision: 100,
                stores: Default::default(),
                requests: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            addr,
        });
        let s = shared.clone();
        let accept = thread::spawn(move || accept_loop(&s, listener));
        FakeApiServer {
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// Writes a kubeconfig whose only context points at this server with a
    /// static bearer token.
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_via(path, &self.url());
    }

    /// Like [`Self::write_kubeconfig`], reaching the server at `url` (its
    /// address as seen from another network namespace).
    pub fn write_kubeconfig_via(&self, path: &Path, url: &str) {
        write_kubeconfig(path, url);
    }

    /// Every request so far, as `METHOD TARGET` with the query as sent.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state().requests.clone()
    }

    /// The current cluster-wide resourceVersion.
    pub fn revision(&self) -> String {
        self.shared.state().revision.to_string()
    }

    /// How many watch streams of `resource` are open now.
    pub fn open_watches(&self, resource: Resource) -> usize {
        self.shared.state().stores[resource.index()].open_watches
    }

    /// The object as stored now (`namespace` is ignored for namespaces).
    pub fn object(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let key = if resource.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_owned()
        };
        self.shared.state().stores[resource.index()]
            .objects
            .get(&key)
            .cloned()
    }

    /// Creates or replaces `obj` (ADDED or MODIFIED), gives it the next
    /// resourceVersion and tells open watches. Returns the object as stored.
    pub fn set_object(&self, resource: Resource, mut obj: Value) -> Value {
        stamp_type_meta(resource, &mut obj);
        let key = key_of(resource, &obj);
        let mut state = self.shared.state();
        state.revision += 1;
        let rv = state.revision;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let store = &mut state.stores[resource.index()];
        let previous = store.objects.insert(key, obj.clone());
        let kind = if previous.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        store.log.push(Entry::Change {
            rv,
            kind,
            object: obj.clone(),
            previous,
        });
        drop(state);
        self.shared.changed.notify_all();
        obj
    }

    /// Loads `tests/fixtures/kube/NAME` and sets it under the resource its
    /// `kind` names.
    pub fn set_fixture(&self, name: &str) -> Value {
        let obj = fixture(name);
        let kind = obj["kind"].as_str().unwrap_or_default();
        let resource = Resource::of_kind(kind)
            .unwrap_or_else(|| panic!("fixture {name}: no resource serves kind {kind:?}"));
        self.set_object(resource, obj)
    }

    /// Deletes an object (DELETED with its last state, at a new
    /// resourceVersion, as the API server reports a deletion). `namespace`
    /// is ignored for namespaces themselves.
    pub fn delete_object(&self, resource: Resource, namespace: &str, name: &str) -> Value {
        let key = if resource.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_owned()
        };
        let mut state = self.shared.state();
        state.revision += 1;
        let rv = state.revision;
        let store = &mut state.stores[resource.index()];
        let mut obj = store
            .objects
            .remove(&key)
            .unwrap_or_else(|| panic!("delete {} {key}: no such object", resource.plural()));
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.log.push(Entry::Change {
            rv,
            kind: ChangeKind::Deleted,
            object: obj.clone(),
            previous: None,
        });
        drop(state);
        self.shared.changed.notify_all();
        obj
    }

    /// Sends a BOOKMARK at the current resourceVersion to open watches of
    /// `resource` that allowed bookmarks.
    pub fn bookmark(&self, resource: Resource) {
        self.push(resource, |state| Entry::Bookmark { rv: state.revision });
    }

    /// Ends open watches of `resource` with a 410 Expired ERROR event, and
    /// forgets its history: from now on a watch from a resourceVersion older
    /// than the current one gets that same event and ends, so the client has
    /// to list again.
    pub fn expire(&self, resource: Resource) {
        self.push(resource, |state| {
            // The cluster moves on, as etcd compacts behind other writes: the
            // version a client last saw is now too old, while a fresh list
            // gives one that is not.
            state.revision += 1;
            let rv = state.revision;
            state.stores[resource.index()].oldest_rv = rv;
            Entry::Expire { rv }
        });
    }

    /// Closes open watch streams of `resource` mid-stream, without the final
    /// chunk, as a dropped connection or a restarted API server would.
    pub fn cut_watches(&self, resource: Resource) {
        self.push(resource, |_| Entry::Cut);
    }

    /// Answers `verb` ("get", "list", "watch", "patch" or "*" for all) on `resource` with
    /// 403 Forbidden from now on. Open watches carry on, as with real RBAC.
    pub fn deny(&self, resource: Resource, verb: &str) {
        assert!(
            matches!(verb, "get" | "list" | "watch" | "patch" | "*"),
            "deny: unknown verb {verb:?}"
        );
        self.shared.state().stores[resource.index()]
            .denied
            .insert(verb.to_owned());
    }

    /// Lifts every denial on `resource`.
    pub fn allow(&self, resource: Resource) {
        self.shared.state().stores[resource.index()].denied.clear();
    }

    fn push(&self, resource: Resource, entry: impl FnOnce(&mut State) -> Entry) {
        let mut state = self.shared.state();
        let entry = entry(&mut state);
        state.stores[resource.index()].log.push(entry);
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        {
            // Set under the lock so that no watch can miss the wake-up
            // between checking the flag and waiting.
            let _state = self.shared.state();
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        self.shared.changed.notify_all();
        // Wake the blocking accept() so it sees the flag; once it has
        // returned no connection can be added behind our back.
        if let Some(accept) = self.accept.take()
            && TcpStream::connect_timeout(&self.shared.addr, Duration::from_secs(1)).is_ok()
        {
            let _ = accept.join();
        }
        for conn in lock(&self.shared.conns).values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(id, clone);
        }
        let s = shared.clone();
        let worker = thread::spawn(move || {
            serve_connection(&s, stream);
            lock(&s.conns).remove(&id);
        });
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        workers.push(worker);
    }
}

struct Request {
    method: String,
    /// Path and query exactly as sent.
    target: String,
    path: String,
    query: HashMap<String, String>,
    close: bool,
    body: Vec<u8>,
}

/// What a handler left the connection fit for.
enum Outcome {
    /// The response is complete; the connection may serve another request.
    Done,
    /// Drop the connection now (a cut watch, or the server is stopping).
    Close,
}

/// Serves requests one after another on one connection (HTTP/1.1
/// keep-alive: hyper reuses connections between list and watch calls).
fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    while let Ok(Some(request)) = read_request(&mut reader) {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        shared
            .state()
            .requests
            .push(format!("{} {}", request.method, request.target));
        match handle(shared, &request, &mut out) {
            Ok(Outcome::Done) if !request.close => {}
            _ => break,
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

/// Reads one request: its head and (with a Content-Length) its body.
/// `None` at a clean end of the connection.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut close = version == "HTTP/1.0";
    let (mut length, mut chunked) = (0u64, false);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "connection" => {
                close = value.contains("close") || (close && !value.contains("keep-alive"))
            }
            "content-length" => length = value.parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.contains("chunked"),
            _ => {}
        }
    }
    // kube-rs sends bodies (PATCH) with a Content-Length; a chunked one is
    // not worth parsing, so the connection ends after it.
    close |= chunked;
    let mut body = Vec::new();
    reader.by_ref().take(length).read_to_end(&mut body)?;
    let (path, raw_query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let path = path.trim_end_matches('/').to_owned();
    let query = raw_query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        path,
        query,
        method,
        target,
        close,
        body,
    }))
}

/// Decodes `%XX` and `+` (form encoding, which is how kube-rs writes
/// `fieldSelector=spec.nodeName%3Dnode-a`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(shared: &Shared, req: &Request, out: &mut TcpStream) -> io::Result<Outcome> {
    match req.path.as_str() {
        "/version" => return respond(out, 200, &version(), req.close),
        "/api" => {
            let body = json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                ],
            });
            return respond(out, 200, &body, req.close);
        }
        "/apis" => return respond(out, 200, &api_groups(), req.close),
        _ => {}
    }
    let Some(route) = Route::parse(&req.path) else {
        let body = status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            json!({}),
        );
        return respond(out, 404, &body, req.close);
    };
    let (code, body) = match (req.method.as_str(), &route.name, route.status) {
        ("GET", None, _) if req.query.get("watch").is_some_and(|w| parse_bool(w)) => {
            return watch(shared, req, &route, out);
        }
        ("GET", None, _) => list(shared, req, &route),
        ("GET", Some(name), false) => get(shared, &route, name),
        ("PATCH", Some(name), true) => patch_status(shared, req, &route, name),
        _ => (
            405,
            status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                json!({}),
            ),
        ),
    };
    respond(out, code, &body, req.close)
}

/// What a request path names: a resource's collection (cluster-wide or in
/// a namespace), one object, or one object's status.
struct Route {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        Resource::ALL.into_iter().find_map(|resource| {
            let rest = path.strip_prefix(&resource.base())?.strip_prefix('/')?;
            let parts: Vec<&str> = rest.split('/').collect();
            let route = |namespace: Option<&str>, name: Option<&str>, status| Route {
                resource,
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                status,
            };
            match parts.as_slice() {
                [plural] if *plural == resource.plural() => Some(route(None, None, false)),
                ["namespaces", ns, plural, tail @ ..]
                    if resource.namespaced() && *plural == resource.plural() =>
                {
                    match tail {
                        [] => Some(route(Some(ns), None, false)),
                        [name] => Some(route(Some(ns), Some(name), false)),
                        [name, "status"] => Some(route(Some(ns), Some(name), true)),
                        _ => None,
                    }
                }
                _ => None,
            }
        })
    }

    fn key(&self, name: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        }
    }
}

/// One object, as `GET .../NAME` returns it (with kind and apiVersion).
fn get(shared: &Shared, route: &Route, name: &str) -> (u16, Value) {
    let state = shared.state();
    let store = &state.stores[route.resource.index()];
    if let Some(refusal) = forbidden(store, route.resource, "get") {
        return (403, refusal);
    }
    match store.objects.get(&route.key(name)) {
        Some(obj) => (200, obj.clone()),
        None => (404, not_found(route.resource, name)),
    }
}

/// A JSON merge patch (RFC 7386) of an object's status, as a controller
/// writes conditions: only `status` changes, and the change is an event.
fn patch_status(shared: &Shared, req: &Request, route: &Route, name: &str) -> (u16, Value) {
    let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
        return (
            400,
            status(400, "BadRequest", "the patch is not JSON", json!({})),
        );
    };
    let resource = route.resource;
    let key = route.key(name);
    let mut state = shared.state();
    if let Some(refusal) = forbidden(&state.stores[resource.index()], resource, "patch") {
        return (403, refusal);
    }
    let Some(previous) = state.stores[resource.index()].objects.get(&key).cloned() else {
        return (404, not_found(resource, name));
    };
    let mut obj = previous.clone();
    merge_patch(&mut obj["status"], &patch["status"]);
    state.revision += 1;
    let rv = state.revision;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let store = &mut state.stores[resource.index()];
    store.objects.insert(key, obj.clone());
    store.log.push(Entry::Change {
        rv,
        kind: ChangeKind::Modified,
        object: obj.clone(),
        previous: Some(previous),
    });
    drop(state);
    shared.changed.notify_all();
    (200, obj)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn not_found(resource: Resource, name: &str) -> Value {
    let message = format!("{} \"{name}\" not found", resource.qualified());
    let mut details = details(resource);
    details["name"] = json!(name);
    status(404, "NotFound", &message, details)
}

fn list(shared: &Shared, req: &Request, route: &Route) -> (u16, Value) {
    let resource = route.resource;
    let selector = match Selector::parse(route, &req.query) {
        Ok(selector) => selector,
        Err(refusal) => return (400, refusal),
    };
    let state = shared.state();
    let store = &state.stores[resource.index()];
    if let Some(refusal) = forbidden(store, resource, "list") {
        return (403, refusal);
    }
    // Items of a list carry no kind or apiVersion: the list says them once.
    let items: Vec<Value> = store
        .objects
        .values()
        .filter(|obj| selector.matches(obj))
        .map(|obj| {
            let mut item = obj.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    // limit/continue are accepted and ignored: everything fits in one page,
    // so no continue token is returned.
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": state.revision.to_string()},
        "items": items,
    });
    (200, body)
}

/// How a watch stream ends.
enum End {
    /// With the terminating zero-length chunk (timeout, or after an ERROR).
    Clean,
    /// By closing the connection without it.
    Abort,
}

/// One open watch stream: what it asked for and how far it has read.
struct Watch {
    resource: Resource,
    selector: Selector,
    bookmarks: bool,
    deadline: Option<Instant>,
    /// The next entry of the resource's log to look at.
    cursor: usize,
    /// The last resourceVersion this watch has passed, for a later 410.
    seen_rv: u64,
}

fn watch(
    shared: &Shared,
    req: &Request,
    route: &Route,
    out: &mut TcpStream,
) -> io::Result<Outcome> {
    let resource = route.resource;
    let (mut watch, first, expired) = match start_watch(shared, req, route) {
        Ok(started) => started,
        Err((code, body)) => return respond(out, code, &body, req.close),
    };
    let _open = OpenWatch { shared, resource };
    out.write_all(
        b"HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\n\
          Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    )?;
    if req.close {
        out.write_all(b"Connection: close\r\n")?;
    }
    out.write_all(b"\r\n")?;
    write_chunks(out, &first)?;
    if expired {
        out.write_all(b"0\r\n\r\n")?;
        return Ok(Outcome::Done);
    }
    loop {
        let Some((events, end)) = watch.next_batch(shared) else {
            return Ok(Outcome::Close);
        };
        write_chunks(out, &events)?;
        match end {
            None => {}
            Some(End::Clean) => {
                out.write_all(b"0\r\n\r\n")?;
                return Ok(Outcome::Done);
            }
            Some(End::Abort) => return Ok(Outcome::Close),
        }
    }
}

/// Checks a watch request and, under the same lock that orders every
/// change, works out the events it starts with and registers it as open.
/// Returns the watch, its first events, and whether they end it (410).
fn start_watch(
    shared: &Shared,
    req: &Request,
    route: &Route,
) -> Result<(Watch, Vec<Value>, bool), (u16, Value)> {
    let resource = route.resource;
    let q = &req.query;
    let selector = Selector::parse(route, q).map_err(|e| (400, e))?;
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| parse_bool(b));
    let send_initial = q.get("sendInitialEvents").map(|b| parse_bool(b));
    if send_initial.is_some()
        && q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan")
    {
        return Err((422, invalid_send_initial_events()));
    }
    let deadline = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|secs| Instant::now() + Duration::from_secs(secs));
    let requested = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            let msg = format!("invalid resource version: {rv}");
            (400, status(400, "BadRequest", &msg, json!({})))
        })?),
    };
    // Unset or "0" means "start from any state": the server first sends the
    // current objects as synthetic ADDED events (unless told not to).
    let initial = send_initial.unwrap_or(requested.is_none());

    let mut state = shared.state();
    let revision = state.revision;
    let store = &mut state.stores[resource.index()];
    if let Some(refusal) = forbidden(store, resource, "watch") {
        return Err((403, refusal));
    }
    let mut first = Vec::new();
    let mut expired = false;
    let mut seen_rv = requested.unwrap_or(revision);
    if initial {
        seen_rv = revision;
        first.extend(
            store
                .objects
                .values()
                .filter(|obj| selector.matches(obj))
                .map(|obj| event("ADDED", obj.clone())),
        );
        if send_initial == Some(true) && bookmarks {
            first.push(bookmark_event(resource, revision, true));
        }
    } else if let Some(rv) = requested {
        if rv < store.oldest_rv {
            first.push(expired_event(rv, store.oldest_rv));
            expired = true;
        } else {
            // Resume: replay what happened after the client's version.
            for entry in &store.log {
                if let Entry::Change { rv: at, .. } = entry
                    && *at > rv
                {
                    seen_rv = *at;
                    first.extend(change_event(entry, &selector));
                }
            }
        }
    }
    store.open_watches += 1;
    let watch = Watch {
        resource,
        selector,
        bookmarks,
        deadline,
        cursor: store.log.len(),
        seen_rv,
    };
    Ok((watch, first, expired))
}

impl Watch {
    /// Waits for log entries past the cursor (or the deadline) and turns
    /// them into events, with how the stream ends if it does. `None` when
    /// the server is stopping.
    fn next_batch(&mut self, shared: &Shared) -> Option<(Vec<Value>, Option<End>)> {
        let mut state = shared.state();
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                return None;
            }
            if state.stores[self.resource.index()].log.len() > self.cursor {
                break;
            }
            let Some(deadline) = self.deadline else {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            if now >= deadline {
                // The real server sends a bookmark as a watch times out, so
                // that the client resumes from there.
                let events = if self.bookmarks {
                    vec![bookmark_event(self.resource, state.revision, false)]
                } else {
                    Vec::new()
                };
                return Some((events, Some(End::Clean)));
            }
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let log = &state.stores[self.resource.index()].log;
        let mut events = Vec::new();
        let mut end = None;
        for entry in &log[self.cursor..] {
            match entry {
                Entry::Change { rv, .. } => {
                    events.extend(change_event(entry, &self.selector));
                    self.seen_rv = *rv;
                }
                Entry::Bookmark { rv } => {
                    if self.bookmarks {
                        events.push(bookmark_event(self.resource, *rv, false));
                    }
                    self.seen_rv = *rv;
                }
                Entry::Expire { rv } => {
                    events.push(expired_event(self.seen_rv, *rv));
                    end = Some(End::Clean);
                    break;
                }
                Entry::Cut => {
                    end = Some(End::Abort);
                    break;
                }
            }
        }
        self.cursor = log.len();
        Some((events, end))
    }
}

/// Counts a watch as open for as long as it streams, whichever way it ends.
struct OpenWatch<'a> {
    shared: &'a Shared,
    resource: Resource,
}

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.shared.state().stores[self.resource.index()].open_watches -= 1;
    }
}

/// Each event is one JSON object and a newline, in a chunk of its own.
fn write_chunks(out: &mut TcpStream, events: &[Value]) -> io::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::new();
    for ev in events {
        let line = format!("{ev}\n");
        buf.extend_from_slice(format!("{:x}\r\n", line.len()).as_bytes());
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    out.write_all(&buf)?;
    out.flush()
}

/// The event a watcher with this selector sees for a change, if any.
/// An object that starts matching arrives as ADDED and one that stops
/// matching leaves as DELETED, as the API server reports them.
fn change_event(entry: &Entry, selector: &Selector) -> Option<Value> {
    let Entry::Change {
        kind,
        object,
        previous,
        ..
    } = entry
    else {
        return None;
    };
    let now = selector.matches(object);
    let before = previous.as_ref().is_some_and(|p| selector.matches(p));
    let kind = match (kind, before, now) {
        (ChangeKind::Deleted, _, true) => "DELETED",
        (ChangeKind::Deleted, _, false) => return None,
        (_, true, true) => "MODIFIED",
        (_, false, true) => "ADDED",
        (_, true, false) => "DELETED",
        (_, false, false) => return None,
    };
    Some(event(kind, object.clone()))
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

/// A bookmark carries only the type's kind and apiVersion and a
/// resourceVersion; the one closing a streaming list's initial events is
/// annotated `k8s.io/initial-events-end: "true"`.
fn bookmark_event(resource: Resource, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
    });
    event("BOOKMARK", object)
}

fn expired_event(requested: u64, current: u64) -> Value {
    let msg = format!("too old resource version: {requested} ({current})");
    event("ERROR", status(410, "Expired", &msg, Value::Null))
}

/// A `Status` as the API server sends with every failure.
fn status(code: u16, reason: &str, message: &str, details: Value) -> Value {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if !details.is_null() {
        body["details"] = details;
    }
    body
}

fn details(resource: Resource) -> Value {
    let mut details = json!({"kind": resource.plural()});
    if !resource.group().is_empty() {
        details["group"] = json!(resource.group());
    }
    details
}

/// The refusal RBAC gives when `verb` is denied on `resource`.
fn forbidden(store: &Store, resource: Resource, verb: &str) -> Option<Value> {
    if !store.denied.contains(verb) && !store.denied.contains("*") {
        return None;
    }
    let message = format!(
        "{} is forbidden: User \"{USER}\" cannot {verb} resource \"{}\" \
         in API group \"{}\" at the cluster scope",
        resource.qualified(),
        resource.plural(),
        resource.group(),
    );
    Some(status(403, "Forbidden", &message, details(resource)))
}

/// `sendInitialEvents` without `resourceVersionMatch=NotOlderThan` is
/// rejected by the API server's validation of list options.
fn invalid_send_initial_events() -> Value {
    let cause = "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan";
    status(
        422,
        "Invalid",
        &format!(
            "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: {cause}"
        ),
        json!({
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{
                "reason": "FieldValueForbidden",
                "message": format!("Forbidden: {cause}"),
                "field": "resourceVersionMatch",
            }],
        }),
    )
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "30",
        "gitVersion": "v1.30.5",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-09-10T11:20:04Z",
        "goVersion": "go1.22.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_groups() -> Value {
    let v1 = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
    let sluice = json!({"groupVersion": "sluice.io/v1alpha1", "version": "v1alpha1"});
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {"name": "discovery.k8s.io", "versions": [v1], "preferredVersion": v1},
            {"name": "sluice.io", "versions": [sluice], "preferredVersion": sluice},
        ],
    })
}

fn respond(out: &mut TcpStream, code: u16, body: &Value, close: bool) -> io::Result<Outcome> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Entity",
        _ => "Error",
    };
    // The API server's JSON encoder ends every body with a newline.
    let body = format!("{body}\n");
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nCache-Control: no-cache, private\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()?;
    Ok(Outcome::Done)
}

/// Go's strconv.ParseBool, which the API server uses for query flags.
fn parse_bool(s: &str) -> bool {
    matches!(s, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// What a list or watch selects: the namespace of its path, and field and
/// label selectors, each terms joined by commas that must all hold.
struct Selector {
    /// `field=value`, `field==value` and `field!=value`, over the fields the
    /// API server supports for each resource.
    fields: Vec<(String, bool, String)>,
    /// `key=value`, `key==value`, `key!=value`, `key` and `!key`.
    labels: Vec<LabelTerm>,
}

enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    fn parse(route: &Route, query: &HashMap<String, String>) -> Result<Selector, Value> {
        let resource = route.resource;
        let bad = |msg: String| status(400, "BadRequest", &msg, json!({}));
        let mut fields = Vec::new();
        if let Some(ns) = &route.namespace {
            fields.push(("metadata.namespace".to_owned(), true, ns.clone()));
        }
        let terms = |key: &str| {
            query
                .get(key)
                .map_or("", String::as_str)
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        for term in terms("fieldSelector") {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(bad(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || (resource == Resource::Pods
                    && matches!(
                        field,
                        "spec.nodeName"
                            | "spec.serviceAccountName"
                            | "status.phase"
                            | "status.podIP"
                    ));
            if !supported {
                return Err(bad(format!("field label not supported: {field}")));
            }
            fields.push((field.to_owned(), equal, value.to_owned()));
        }
        let mut labels = Vec::new();
        for term in terms("labelSelector") {
            labels.push(if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::NotEquals(k.to_owned(), v.to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelTerm::Equals(k.to_owned(), v.to_owned())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelTerm::Absent(k.to_owned())
            } else if term.contains([' ', '(']) {
                return Err(bad(format!(
                    "unable to parse requirement: set-based selectors are not served here: {term}"
                )));
            } else {
                LabelTerm::Exists(term)
            });
        }
        Ok(Selector { fields, labels })
    }

    fn matches(&self, obj: &Value) -> bool {
        let fields = self.fields.iter().all(|(field, equal, value)| {
            // A field that is not set compares as "", like an unscheduled
            // pod's spec.nodeName.
            let actual = field
                .split('.')
                .fold(obj, |v, part| &v[part])
                .as_str()
                .unwrap_or("");
            (actual == value) == *equal
        });
        let label = |k: &str| obj["metadata"]["labels"][k].as_str();
        fields
            && self.labels.iter().all(|term| match term {
                LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
                LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
                LabelTerm::Exists(k) => label(k).is_some(),
                LabelTerm::Absent(k) => label(k).is_none(),
            })
    }
}

/// Gives `obj` its resource's kind and apiVersion, refusing another kind.
fn stamp_type_meta(resource: Resource, obj: &mut Value) {
    let map = obj
        .as_object_mut()
        .unwrap_or_else(|| panic!("a {} must be a JSON object", resource.kind()));
    if let Some(kind) = map.get("kind").and_then(Value::as_str) {
        assert_eq!(
            kind,
            resource.kind(),
            "set_object: a {kind} given as {}",
            resource.plural()
        );
    }
    map.insert("kind".into(), json!(resource.kind()));
    map.insert("apiVersion".into(), json!(resource.api_version()));
}

fn key_of(resource: Resource, obj: &Value) -> String {
    let meta = &obj["metadata"];
    let name = meta["name"]
        .as_str()
        .unwrap_or_else(|| panic!("a {} needs metadata.name", resource.kind()));
    if resource.namespaced() {
        let ns = meta["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("{} {name} needs metadata.namespace", resource.kind()));
        format!("{ns}/{name}")
    } else {
        name.to_owned()
    }
}

/// Writes a kubeconfig whose only context points at `url` with a static
/// bearer token (as JSON, which is YAML).
pub fn write_kubeconfig(path: &Path, url: &str) {
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "fake", "cluster": { "server": url } }],
        "users": [{ "name": "sluice", "user": { "token": "fake-sluice-token" } }],
        "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": "sluice" } }],
        "current-context": "fake",
        "preferences": {}
    });
    std::fs::write(path, kubeconfig.to_string())
        .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
}

//! The fake Kubernetes API server speaks the wire format the discovery code
//! will meet: lists, chunked watch streams resumed from a resourceVersion,
//! bookmarks, streaming lists, 410 expiry, cut streams and RBAC refusals.
//! A plain HTTP/1.1 client reads it here, so that no client library can
//! paper over a mistake in the fake.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use crate::support::kubeapi::{FakeApiServer, Resource, fixture};
use crate::support::{TempDir, wait_until};
use serde_json::{Value, json};

const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

/// One keep-alive HTTP/1.1 connection to the fake server.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A response's status code and headers (names in lower case).
struct Head {
    code: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn connect(api: &FakeApiServer) -> Client {
        let url = api.url();
        let stream = TcpStream::connect(url.trim_start_matches("http://")).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends a GET and reads the response's head.
    fn get(&mut self, target: &str) -> Head {
        self.send(target, "");
        self.head()
    }

    fn send(&mut self, target: &str, extra_headers: &str) {
        write!(
            self.writer,
            "GET {target} HTTP/1.1\r\nHost: kubernetes\r\nAccept: application/json\r\n\
             {extra_headers}\r\n"
        )
        .unwrap();
    }

    fn head(&mut self) -> Head {
        let status = self.line();
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                return Head { code, headers };
            }
            let (name, value) = line.split_once(':').expect("a header line");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads a body of Content-Length bytes as JSON.
    fn body(&mut self, head: &Head) -> Value {
        let len = head.header("content-length").expect("content-length");
        let mut buf = vec![0; len.parse().unwrap()];
        self.reader.read_exact(&mut buf).unwrap();
        serde_json::from_slice(&buf).expect("a JSON body")
    }

    /// The next chunk of a chunked body; `None` at the terminating
    /// zero-length chunk.
    fn chunk(&mut self) -> Option<Vec<u8>> {
        let line = self.line();
        let size = usize::from_str_radix(&line, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        if size == 0 {
            assert_eq!(self.line(), "", "no trailers after the last chunk");
            return None;
        }
        let mut buf = vec![0; size + 2];
        self.reader.read_exact(&mut buf).unwrap();
        assert!(buf.ends_with(b"\r\n"), "a chunk ends with CRLF");
        buf.truncate(size);
        Some(buf)
    }

    /// The next watch event: one JSON object and a newline, in its own chunk.
    fn event(&mut self) -> Value {
        let chunk = self
            .chunk()
            .expect("another event, not the end of the stream");
        assert_eq!(chunk.last(), Some(&b'\n'), "an event ends with a newline");
        serde_json::from_slice(&chunk).expect("an event is one JSON object")
    }

    /// Everything until the server closes the connection.
    fn rest(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
        rest
    }
}

fn rv_of(event: &Value) -> u64 {
    event["object"]["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion")
        .parse()
        .expect("a resourceVersion is an integer")
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().expect("a name")
}

fn list_version(client: &mut Client, path: &str) -> String {
    let head = client.get(path);
    assert_eq!(head.code, 200);
    let list = client.body(&head);
    list["metadata"]["resourceVersion"]
        .as_str()
        .expect("a list has a resourceVersion")
        .to_owned()
}

#[test]
fn a_list_has_the_current_version_and_its_items_carry_no_type_meta() {
    let api = FakeApiServer::start();
    for name in [
        "pod-checkout-a1.json",
        "pod-checkout-a2.json",
        "pod-checkout-b1.json",
        "pod-hostnetwork.json",
    ] {
        api.set_fixture(name);
    }
    let mut client = Client::connect(&api);

    let target = "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a&limit=500";
    let head = client.get(target);

    assert_eq!(head.code, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    let list = client.body(&head);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["metadata"]["resourceVersion"], api.revision().as_str());
    assert!(list["metadata"].get("continue").is_none());
    let items = list["items"].as_array().unwrap();
    // Only node-a, in etcd's key order: namespace, then name.
    let names: Vec<&str> = items.iter().map(name_of).collect();
    assert_eq!(
        names,
        [
            "node-probe-6xw4m",
            "checkout-6b8d9c7f4-2xkqp",
            "checkout-6b8d9c7f4-9mzrt"
        ]
    );
    for item in items {
        assert!(item.get("kind").is_none(), "{item}");
        assert!(item.get("apiVersion").is_none(), "{item}");
    }

    // The same connection serves the next request.
    let head = client.get(SLICES);
    assert_eq!(head.code, 200);
    assert_eq!(client.body(&head)["kind"], "EndpointSliceList");
    assert_eq!(
        api.requests(),
        [format!("GET {target}"), format!("GET {SLICES}")]
    );
}

#[test]
fn a_watch_from_the_listed_version_streams_every_change_in_order() {
    let api = FakeApiServer::start();
    api.set_fixture("service-checkout.json");
    api.set_fixture("endpointslice-checkout.json");
    let mut client = Client::connect(&api);
    let listed = list_version(&mut client, SLICES);

    let head = client.get(&format!(
        "{SLICES}?allowWatchBookmarks=true&resourceVersion={listed}&timeoutSeconds=60&watch=true"
    ));
    assert_eq!(head.code, 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert!(wait_until(Duration::from_secs(5), || {
        api.open_watches(Resource::EndpointSlices) == 1
    }));

    // One endpoint fewer: MODIFIED, with kind, apiVersion and a newer version.
    let mut slice = fixture("endpointslice-checkout.json");
    slice["endpoints"].as_array_mut().unwrap().pop();
    api.set_object(Resource::EndpointSlices, slice);
    let modified = client.event();
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["kind"], "EndpointSlice");
    assert_eq!(modified["object"]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(modified["object"]["endpoints"].as_array().unwrap().len(), 3);
    assert!(rv_of(&modified) > listed.parse().unwrap());

    api.set_fixture("endpointslice-orphan.json");
    api.bookmark(Resource::EndpointSlices);
    api.delete_object(Resource::EndpointSlices, "shop", "inventory-5kq9z");

    let added = client.event();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(name_of(&added["object"]), "inventory-5kq9z");
    let bookmark = client.event();
    assert_eq!(bookmark["type"], "BOOKMARK");
    let mut keys: Vec<&str> = bookmark["object"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["apiVersion", "kind", "metadata"]);
    assert_eq!(bookmark["object"]["kind"], "EndpointSlice");
    assert_eq!(
        bookmark["object"]["metadata"],
        json!({"resourceVersion": rv_of(&added).to_string()})
    );
    let deleted = client.event();
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(
        deleted["object"]["endpoints"][0]["addresses"][0],
        "198.18.203.2"
    );
    assert!(rv_of(&deleted) > rv_of(&added));

    api.expire(Resource::EndpointSlices);
    let error = client.event();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        error["object"],
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "too old resource version: {} ({})",
                rv_of(&deleted),
                rv_of(&deleted) + 1
            ),
            "reason": "Expired",
            "code": 410,
        })
    );
    assert_eq!(
        client.chunk(),
        None,
        "the stream ends cleanly after the error"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        api.open_watches(Resource::EndpointSlices) == 0
    }));

    // Resuming from before the expiry gets the same error, then the end ...
    let head = client.get(&format!(
        "{SLICES}?allowWatchBookmarks=true&resourceVersion={}&watch=true",
        rv_of(&modified)
    ));
    assert_eq!(head.code, 200);
    let error = client.event();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(client.chunk(), None);

    // ... and a fresh list gives a version to watch from again.
    let listed = list_version(&mut client, SLICES);
    let head = client.get(&format!(
        "{SLICES}?allowWatchBookmarks=true&resourceVersion={listed}&timeoutSeconds=60&watch=true"
    ));
    assert_eq!(head.code, 200);
    api.set_fixture("endpointslice-orphan.json");
    assert_eq!(client.event()["type"], "ADDED");
}

#[test]
fn a_watch_replays_what_happened_after_its_resource_version() {
    let api = FakeApiServer::start();
    api.set_fixture("namespace-default.json");
    let listed = api.revision();
    api.set_fixture("namespace-shop.json");
    let mut shop = fixture("namespace-shop.json");
    shop["metadata"]["annotations"]["sluice.io/mode"] = json!("permissive");
    api.set_object(Resource::Namespaces, shop);
    let mut client = Client::connect(&api);

    let head = client.get(&format!(
        "/api/v1/namespaces?resourceVersion={listed}&watch=1"
    ));

    assert_eq!(head.code, 200);
    let added = client.event();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(name_of(&added["object"]), "shop");
    let modified = client.event();
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(
        modified["object"]["metadata"]["annotations"]["sluice.io/mode"],
        "permissive"
    );
    // Bookmarks were not asked for, so the next event is the deletion.
    api.bookmark(Resource::Namespaces);
    api.delete_object(Resource::Namespaces, "", "shop");
    assert_eq!(client.event()["type"], "DELETED");
}

#[test]
fn a_pod_watch_for_one_node_sees_pods_as_they_enter_and_leave_that_node() {
    let api = FakeApiServer::start();
    let mut client = Client::connect(&api);
    let selector = "fieldSelector=spec.nodeName%3Dnode-a";
    let listed = list_version(&mut client, &format!("/api/v1/pods?{selector}"));
    let head = client.get(&format!(
        "/api/v1/pods?allowWatchBookmarks=true&{selector}&resourceVersion={listed}\
         &timeoutSeconds=60&watch=true"
    ));
    assert_eq!(head.code, 200);

    // A pod of node-b and a pod not yet scheduled are not this node's.
    api.set_fixture("pod-checkout-b1.json");
    let mut pending = fixture("pod-checkout-a1.json");
    pending["spec"].as_object_mut().unwrap().remove("nodeName");
    api.set_object(Resource::Pods, pending);
    api.bookmark(Resource::Pods);
    assert_eq!(client.event()["type"], "BOOKMARK");

    // Bound to node-a: a modification of the pod, an addition for the node.
    api.set_fixture("pod-checkout-a1.json");
    let bound = client.event();
    assert_eq!(bound["type"], "ADDED");
    assert_eq!(name_of(&bound["object"]), "checkout-6b8d9c7f4-2xkqp");

    // Moved away (not something pods do, but a selector must handle it).
    let mut moved = fixture("pod-checkout-a1.json");
    moved["spec"]["nodeName"] = json!("node-b");
    api.set_object(Resource::Pods, moved);
    let left = client.event();
    assert_eq!(left["type"], "DELETED");
    assert_eq!(left["object"]["spec"]["nodeName"], "node-b");

    // A field the API server does not index for pods is refused.
    let mut other = Client::connect(&api);
    let head = other.get("/api/v1/pods?fieldSelector=spec.hostNetwork%3Dtrue");
    assert_eq!(head.code, 400);
    assert_eq!(
        other.body(&head)["message"],
        "field label not supported: spec.hostNetwork"
    );
}

#[test]
fn a_streaming_list_sends_the_objects_then_a_bookmark_marking_their_end() {
    let api = FakeApiServer::start();
    api.set_fixture("namespace-shop.json");
    api.set_fixture("namespace-default.json");
    let mut client = Client::connect(&api);

    let head = client.get(
        "/api/v1/namespaces?watch=true&timeoutSeconds=60&allowWatchBookmarks=true\
         &sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
    );

    assert_eq!(head.code, 200);
    let mut names = Vec::new();
    for _ in 0..2 {
        let event = client.event();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["kind"], "Namespace");
        names.push(name_of(&event["object"]).to_owned());
    }
    assert_eq!(names, ["default", "shop"]);
    let end = client.event();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"],
        json!({
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "resourceVersion": api.revision(),
                "annotations": {"k8s.io/initial-events-end": "true"},
            },
        })
    );
    api.delete_object(Resource::Namespaces, "", "default");
    assert_eq!(client.event()["type"], "DELETED");

    // sendInitialEvents needs resourceVersionMatch=NotOlderThan.
    let mut other = Client::connect(&api);
    let head =
        other.get("/api/v1/namespaces?watch=true&allowWatchBookmarks=true&sendInitialEvents=true");
    assert_eq!(head.code, 422);
    assert_eq!(other.body(&head)["reason"], "Invalid");
}

#[test]
fn a_watch_ends_cleanly_at_its_timeout_and_the_connection_serves_on() {
    let api = FakeApiServer::start();
    api.set_fixture("service-checkout.json");
    let listed = api.revision();
    let mut client = Client::connect(&api);
    let started = Instant::now();

    let head = client.get(&format!(
        "/api/v1/services?allowWatchBookmarks=true&resourceVersion={listed}\
         &timeoutSeconds=1&watch=true"
    ));

    assert_eq!(head.code, 200);
    let bookmark = client.event();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        listed.as_str()
    );
    assert_eq!(client.chunk(), None);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let head = client.get("/version");
    assert_eq!(head.code, 200);
    assert_eq!(client.body(&head)["major"], "1");
}

#[test]
fn a_cut_watch_closes_the_connection_without_the_final_chunk() {
    let api = FakeApiServer::start();
    let mut client = Client::connect(&api);
    assert_eq!(
        client
            .get("/api/v1/services?watch=true&timeoutSeconds=60")
            .code,
        200
    );
    assert!(wait_until(Duration::from_secs(5), || {
        api.open_watches(Resource::Services) == 1
    }));

    api.cut_watches(Resource::Services);

    let rest = client.rest();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(wait_until(Duration::from_secs(5), || {
        api.open_watches(Resource::Services) == 0
    }));
    let mut again = Client::connect(&api);
    assert_eq!(
        again
            .get("/api/v1/services?watch=true&timeoutSeconds=60")
            .code,
        200
    );
}

#[test]
fn denied_verbs_answer_403_with_the_status_rbac_gives_until_allowed() {
    let api = FakeApiServer::start();
    let mut client = Client::connect(&api);

    api.deny(Resource::Services, "list");
    let head = client.get("/api/v1/services?limit=500");
    assert_eq!(head.code, 403);
    assert_eq!(
        client.body(&head),
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "services is forbidden: User \"system:serviceaccount:sluice-system:sluice\" \
                        cannot list resource \"services\" in API group \"\" at the cluster scope",
            "reason": "Forbidden",
            "details": {"kind": "services"},
            "code": 403,
        })
    );
    // Watching is another verb, still allowed.
    let head = client.get("/api/v1/services?watch=true&timeoutSeconds=1");
    assert_eq!(head.code, 200);
    while client.chunk().is_some() {}

    api.deny(Resource::EndpointSlices, "*");
    let head = client.get(&format!("{SLICES}?watch=true"));
    assert_eq!(head.code, 403);
    let status = client.body(&head);
    assert_eq!(
        status["message"],
        "endpointslices.discovery.k8s.io is forbidden: User \
         \"system:serviceaccount:sluice-system:sluice\" cannot watch resource \
         \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"
    );
    assert_eq!(status["details"]["group"], "discovery.k8s.io");

    api.allow(Resource::Services);
    let head = client.get("/api/v1/services");
    assert_eq!(head.code, 200);
    assert_eq!(client.body(&head)["kind"], "ServiceList");
}

#[test]
fn discovery_answers_connection_close_is_honoured_and_the_kubeconfig_points_here() {
    let api = FakeApiServer::start();
    let mut client = Client::connect(&api);
    for (path, kind) in [("/api", "APIVersions"), ("/apis", "APIGroupList")] {
        let head = client.get(path);
        assert_eq!(head.code, 200, "{path}");
        assert_eq!(client.body(&head)["kind"], kind);
    }
    let head = client.get("/api/v1/configmaps");
    assert_eq!(head.code, 404);
    assert_eq!(client.body(&head)["reason"], "NotFound");

    client.send("/version", "Connection: close\r\n");
    let head = client.head();
    assert_eq!(head.code, 200);
    assert_eq!(head.header("connection"), Some("close"));
    assert!(
        client.body(&head)["gitVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1.30.")
    );
    assert!(
        client.rest().is_empty(),
        "the server closes after answering"
    );

    let dir = TempDir::create("kubeconfig").unwrap();
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    let kubeconfig: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(kubeconfig["current-context"], "fake", "{text}");
    let fake = kubeconfig["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "fake"))
        .unwrap_or_else(|| panic!("no cluster `fake` in {text}"));
    assert_eq!(fake["cluster"]["server"], api.url(), "{text}");
}

#[test]
fn dropping_the_server_ends_its_open_watches() {
    let api = FakeApiServer::start();
    let mut client = Client::connect(&api);
    assert_eq!(client.get("/api/v1/pods?watch=true").code, 200);
    assert!(wait_until(Duration::from_secs(5), || {
        api.open_watches(Resource::Pods) == 1
    }));

    let started = Instant::now();
    drop(api);

    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(client.rest().is_empty());
}

//! An HTTP/2 client that is not ours: Python's h2 package.

use super::*;

/// A CONNECT from Python's h2 (an HTTP/2 implementation that is not
/// ours): prints the status and what came back.
const PYTHON_CLIENT: &str = r#"
import socket, sys
import h2.config, h2.connection, h2.events
port, target = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
conn.initiate_connection()
stream = conn.get_next_available_stream_id()
conn.send_headers(stream, [(":method", "CONNECT"), (":authority", target)])
sock.sendall(conn.data_to_send())
status, body, done = None, b"", False
while not done:
    data = sock.recv(65536)
    if not data:
        break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers)[b":status"].decode()
            if status == "200":
                conn.send_data(stream, b"hello from python", end_stream=True)
        elif isinstance(event, h2.events.DataReceived):
            body += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, stream)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    sock.sendall(conn.data_to_send())
print(status, body.decode())
"#;

/// A Python with the h2 package: the one on PATH, or Debian's.
fn python_with_h2() -> &'static str {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|python| {
            std::process::Command::new(python)
                .args(["-c", "import h2.connection"])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .expect("no python3 with the h2 package: `pip install h2` or `apt-get install python3-h2`")
}

#[tokio::test]
async fn a_python_h2_client_speaks_connect() {
    let python = python_with_h2();
    let server = Server::start(config()).await;
    let echo_addr = tcp_echo().await;
    let port = server.addr.port().to_string();
    for (to, expected) in [
        (echo_addr, "200 hello from python"),
        (target(1, REFUSE), "403 "),
    ] {
        let args = [port.clone(), to.to_string()];
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .args(["-c", PYTHON_CLIENT])
                .args(args)
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim_end_matches('\n'), expected);
    }
}

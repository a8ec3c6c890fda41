//! The pool: sizing by its cap and the peer's limit, one dial per burst,
//! GOAWAY, idle connections.

use super::*;

/// Dials plain TCP to one address.
struct TcpDial(SocketAddr);

impl Dial<&'static str> for TcpDial {
    type Io = TcpStream;

    async fn dial(&self, _key: &&'static str) -> std::io::Result<TcpStream> {
        TcpStream::connect(self.0).await
    }
}

/// Counts its dials, each of which fails after the other connects of a
/// burst have had their turn.
struct FailingDial(Arc<AtomicUsize>);

impl Dial<&'static str> for FailingDial {
    type Io = TcpStream;

    async fn dial(&self, _key: &&'static str) -> std::io::Result<TcpStream> {
        self.0.fetch_add(1, SeqCst);
        tokio::task::yield_now().await;
        Err(std::io::ErrorKind::ConnectionRefused.into())
    }
}

fn pool(server: &Server, max_streams: usize) -> Pool<&'static str, TcpDial> {
    let config = PoolConfig {
        max_streams_per_connection: max_streams,
        tunnel: config(),
        ..PoolConfig::default()
    };
    Pool::new(TcpDial(server.addr), config)
}

const KEY: &str = "spiffe://a -> node-b, spiffe://b";

#[tokio::test]
async fn the_pool_dials_again_past_its_cap() {
    let server = Server::start(config()).await;
    let pool = pool(&server, 2);
    // A burst of connects to a new key dials once.
    let burst = (1..=2).map(|i| pool.connect(&KEY, target(i, ECHO), HeaderMap::new()));
    let mut open: Vec<_> = futures::future::join_all(burst).await;
    assert_eq!(pool.usage(&KEY), (1, 2));
    open.push(pool.connect(&KEY, target(3, ECHO), HeaderMap::new()).await);
    assert_eq!(pool.usage(&KEY), (2, 3));
    assert_eq!(server.accepted.load(SeqCst), 2);
    for (i, stream) in open.iter_mut().enumerate() {
        let data = pattern(1000, i as u8);
        let stream = stream.as_mut().unwrap();
        assert_eq!(exchange(stream, &data).await, echoed(&data));
    }
    drop(open);
    assert_eq!(pool.usage(&KEY), (2, 0));
}

#[tokio::test]
async fn the_pool_respects_the_peers_stream_limit() {
    let server = Server::start(TunnelConfig {
        max_concurrent_streams: 3,
        ..config()
    })
    .await;
    let pool = pool(&server, 100);
    let mut first = pool
        .connect(&KEY, target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    // The peer's SETTINGS came before this answer.
    round_trip(&mut first, b"1").await;
    let mut open = vec![first];
    for i in 2..=4 {
        open.push(
            pool.connect(&KEY, target(i, ECHO), HeaderMap::new())
                .await
                .unwrap(),
        );
    }
    assert_eq!(pool.usage(&KEY), (2, 4));
    for stream in &mut open {
        round_trip(stream, b"x").await;
    }
}

/// With a control stream (a pool that names its node), the control
/// stream counts against the peer's limit: a connection takes one data
/// stream fewer, and none is refused.
#[tokio::test]
async fn the_control_stream_counts_against_the_peers_limit() {
    let mut server = Server::start(TunnelConfig {
        max_concurrent_streams: 3,
        ..config()
    })
    .await;
    let config = PoolConfig {
        tunnel: config(),
        node: Some("node-a".into()),
        ..PoolConfig::default()
    };
    let pool = Pool::new(TcpDial(server.addr), config);
    let mut open = Vec::new();
    for i in 1..=4 {
        let connect = pool.connect(&KEY, target(i, ECHO), HeaderMap::new());
        let mut stream = timeout(Duration::from_secs(10), connect)
            .await
            .expect("a stream within 10 s")
            .unwrap();
        round_trip(&mut stream, b"x").await;
        open.push(stream);
    }
    assert_eq!(pool.usage(&KEY), (2, 4), "two data streams a connection");
    while let Ok(event) = server.events.try_recv() {
        assert!(!event.contains("REFUSED_STREAM"), "{event}");
    }
}

#[tokio::test]
async fn the_pool_leaves_a_connection_after_goaway() {
    let mut server = Server::start(config()).await;
    let pool = pool(&server, 100);
    let mut a = pool
        .connect(&KEY, target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    round_trip(&mut a, b"a").await;
    server.generation.send_modify(|g| *g += 1);
    // Wait for the GOAWAY to arrive: the connection leaves the pool.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.sweep() == 0 {
        assert!(Instant::now() < deadline, "no GOAWAY seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut b = pool
        .connect(&KEY, target(2, ECHO), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(server.accepted.load(SeqCst), 2);
    assert_eq!(exchange(&mut b, b"b").await, echoed(b"b"));
    // The stream open on the old connection finishes there.
    assert_eq!(
        exchange(&mut a, b"rest").await,
        [&b"rest"[..], b"end"].concat()
    );
    drop(a);
    server.expect("connection ended: Ok(())").await;
}

#[tokio::test]
async fn the_pool_closes_idle_connections() {
    let mut server = Server::start(config()).await;
    let pool = pool(&server, 100);
    let mut stream = pool
        .connect(&KEY, target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(exchange(&mut stream, b"x").await, echoed(b"x"));
    drop(stream);
    assert_eq!(pool.sweep(), 0, "not idle long enough");
    tokio::time::pause();
    tokio::time::advance(PoolConfig::default().idle_timeout).await;
    assert_eq!(pool.sweep(), 1);
    tokio::time::resume();
    assert_eq!(pool.usage(&KEY), (0, 0));
    // With the pool's handle gone, HTTP/2 closes the connection.
    server.expect("connection ended: Ok(())").await;
}

#[tokio::test]
async fn a_failed_dial_fails_the_connects_that_waited_for_it() {
    let dials = Arc::new(AtomicUsize::new(0));
    let pool = Pool::new(FailingDial(dials.clone()), PoolConfig::default());
    let burst = (1..=5).map(|i| pool.connect(&KEY, target(i, ECHO), HeaderMap::new()));
    for result in futures::future::join_all(burst).await {
        assert!(matches!(result, Err(TunnelError::Dial(_))), "{result:?}");
    }
    assert_eq!(dials.load(SeqCst), 1, "one dial for the burst");
}

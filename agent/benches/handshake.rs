//! What a new connection costs over mTLS versus plaintext, on loopback:
//! TCP connect plus one 1-byte exchange, with no TLS, with a full TLS 1.3
//! mutual handshake, and with a resumed one. The TLS side is the agent's
//! own (certificates from its local CA, its verifiers and resolvers).
//! Run: `cargo bench -p sluice --bench handshake`; connections per second
//! is 1 / time.

use std::{sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use rustls_pki_types::ServerName;
use sluice::{
    config::Config,
    tls::{Identity, TlsContext},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn handshakes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let state = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let config = Config::parse("node:\n  name: bench\n", "bench.yaml").expect("config");
    let checkout = Identity::new("cluster.local", "payments", "checkout");
    let ledger = Identity::new("cluster.local", "payments", "ledger");
    let tls = TlsContext::new(&config.mesh, &state, &[checkout.clone(), ledger.clone()])
        .expect("tls context");

    let (plain_addr, tls_addr) = rt.block_on(async {
        let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let secure = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addrs = (plain.local_addr().unwrap(), secure.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = plain.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&b).await;
                    }
                });
            }
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        tokio::spawn(async move {
            while let Ok((s, _)) = secure.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&b).await;
                        let _ = s.flush().await;
                    }
                });
            }
        });
        addrs
    });

    let mut group = c.benchmark_group("new_connection");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("plaintext", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = TcpStream::connect(plain_addr).await.expect("connect");
                s.write_all(b"x").await.expect("write");
                let mut r = [0u8; 1];
                s.read_exact(&mut r).await.expect("read");
            })
        })
    });
    let name = ServerName::try_from(ledger.server_name()).expect("server name");
    let exchange = |config: Arc<rustls::ClientConfig>| {
        let name = name.clone();
        async move {
            let s = TcpStream::connect(tls_addr).await.expect("connect");
            let mut s = tokio_rustls::TlsConnector::from(config)
                .connect(name, s)
                .await
                .expect("handshake");
            s.write_all(b"x").await.expect("write");
            let mut r = [0u8; 1];
            s.read_exact(&mut r).await.expect("read");
        }
    };
    let base = tls.client_config(&checkout).expect("client config");
    let mut fresh = (*base).clone();
    fresh.resumption = rustls::client::Resumption::disabled();
    let fresh = Arc::new(fresh);
    group.bench_function("mtls_full_handshake", |b| {
        b.iter(|| rt.block_on(exchange(fresh.clone())))
    });
    group.bench_function("mtls_resumed", |b| {
        b.iter(|| rt.block_on(exchange(base.clone())))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&state);
}

criterion_group!(benches, handshakes);
criterion_main!(benches);

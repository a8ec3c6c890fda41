//! The load generator, run as its own process (`xtask loadgen`) so that it
//! can be placed in a workload cgroup and a network namespace like any
//! meshed client. It prints one JSON line of results.
//!
//! Every request is 1 KiB and every response 1 KiB (the backend echoes).

use std::{
    io::{BufRead, Write},
    net::SocketAddr,
    time::Duration,
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

/// Bytes per request and per response.
pub const MESSAGE: usize = 1024;

/// What to run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Workload {
    /// Fixed-rate request/response over persistent connections,
    /// open-loop: latency counts from when a request was due
    /// (coordinated-omission correction).
    Latency,
    /// As many requests as `conns` persistent connections carry.
    Throughput,
    /// Connect, one request, close, from `conns` loops.
    Churn,
    /// Open `conns` connections, one exchange each, then hold them idle
    /// until stdin closes.
    Idle,
    /// Open `conns` connections, say so on stdout, then keep one exchange
    /// every `interval_ms` going on each for `seconds`: the longest an
    /// exchange took is the longest pause a connection saw (an upgrade in
    /// the middle shows there). Errors are counted, not retried.
    Pauses,
    /// `conns` connections each sending `rate` chunks of 64 KiB a second
    /// and reading the echo as it comes, for `seconds`: a bulk transfer
    /// beside which the latency workload shows head-of-line blocking.
    Bulk,
}

/// Arguments of `xtask loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, value_enum)]
    pub workload: Workload,
    #[arg(long, default_value_t = 8)]
    pub conns: usize,
    /// Requests per second over all connections (latency workload); 64
    /// KiB chunks per second per connection (bulk workload).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Between two exchanges on one connection (pauses workload).
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
}

async fn exchange(s: &mut TcpStream, buf: &mut [u8; MESSAGE]) -> std::io::Result<()> {
    s.write_all(&buf[..]).await?;
    s.read_exact(&mut buf[..]).await?;
    Ok(())
}

async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Runs one workload and prints its JSON result.
pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = match args.workload {
        Workload::Latency => latency(&args)?,
        Workload::Throughput => rt.block_on(throughput(&args))?,
        Workload::Churn => rt.block_on(churn(&args))?,
        Workload::Idle => rt.block_on(idle(&args))?,
        Workload::Pauses => rt.block_on(pauses(&args))?,
        Workload::Bulk => rt.block_on(bulk(&args))?,
    };
    println!("{result}");
    Ok(())
}

/// Sleeps until `deadline` on CLOCK_MONOTONIC with nanosecond slack:
/// tokio's timer wheel ticks in milliseconds, far too coarse here.
fn sleep_until_precise(
    deadline: std::time::Instant,
    base: std::time::Instant,
    base_ts: libc::timespec,
) {
    let offset = deadline.saturating_duration_since(base);
    let mut ts = base_ts;
    let nanos = ts.tv_nsec as u64 + u64::from(offset.subsec_nanos());
    ts.tv_sec += offset.as_secs() as libc::time_t + (nanos / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (nanos % 1_000_000_000) as libc::c_long;
    // SAFETY: ts is a valid absolute time; a null remainder is allowed.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        );
    }
}

/// `read_exact` on a blocking socket that also copes with a spurious
/// EAGAIN: a socket in a sockmap (the sockmap bypass) can report one when
/// a wake-up finds no data yet; then wait for readability and go on.
fn read_exact_blocking(s: &mut std::net::TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    use std::{io::Read, os::fd::AsRawFd};
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, -1) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The latency workload on plain threads, one per connection, each
/// sleeping precisely until its next request is due.
fn latency(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    use std::io::Write;
    // SAFETY: prctl on this process; 1 ns timer slack for precise wakeups.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let interval = Duration::from_secs_f64(args.conns as f64 / args.rate as f64);
    let base = std::time::Instant::now();
    let mut base_ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: base_ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut base_ts) };
    let start = base + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(args.seconds);
    let threads: Vec<_> = (0..args.conns)
        .map(|c| {
            let target = args.target;
            let offset = interval.mul_f64(c as f64 / args.conns as f64);
            std::thread::spawn(move || -> std::io::Result<(Histogram<u64>, u64)> {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let connect = || {
                    let s = std::net::TcpStream::connect(target)?;
                    s.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(s)
                };
                let mut s = connect()?;
                let mut buf = [7u8; MESSAGE];
                s.write_all(&buf)?;
                read_exact_blocking(&mut s, &mut buf)?;
                let mut due = start + offset;
                let mut errors = 0u64;
                while due < end {
                    sleep_until_precise(due, base, base_ts);
                    let ok = s
                        .write_all(&buf)
                        .and_then(|()| read_exact_blocking(&mut s, &mut buf));
                    match ok {
                        Ok(()) => {
                            let us = std::time::Instant::now()
                                .saturating_duration_since(due)
                                .as_micros() as u64;
                            hist.saturating_record(us.max(1));
                        }
                        Err(_) => {
                            errors += 1;
                            s = connect()?;
                        }
                    }
                    due += interval;
                }
                Ok((hist, errors))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in threads {
        let (h, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("latency thread panicked"))?
            .context("latency connection")?;
        hist.add(h)?;
        errors += e;
    }
    let quantiles: Vec<(f64, u64)> = [
        0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
    ]
    .iter()
    .map(|q| (*q, hist.value_at_quantile(*q)))
    .collect();
    Ok(json!({
        "requests": hist.len(),
        "errors": errors,
        "p50_us": hist.value_at_quantile(0.5),
        "p90_us": hist.value_at_quantile(0.9),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
        "quantiles": quantiles,
    }))
}

async fn bulk(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.conns {
        let (target, rate) = (args.target, args.rate);
        tasks.push(tokio::spawn(async move {
            let s = connect(target).await?;
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 64 * MESSAGE];
                let mut pace = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
                while Instant::now() < end {
                    pace.tick().await;
                    w.write_all(&chunk).await?;
                }
                w.shutdown().await?;
                Ok::<(), std::io::Error>(())
            });
            let mut buf = vec![0u8; 64 * MESSAGE];
            let mut echoed = 0u64;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
                    Ok(Ok(0)) | Err(_) => break,
                    Ok(Ok(n)) => echoed += n as u64,
                    Ok(Err(e)) => return Err(e),
                }
            }
            writer.await.map_err(std::io::Error::other)??;
            Ok::<u64, std::io::Error>(echoed)
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await?.context("bulk connection")?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({ "bytes": total, "mb_per_s": total as f64 / secs / 1e6 }))
}

async fn throughput(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.conns {
        let target = args.target;
        tasks.push(tokio::spawn(async move {
            let mut s = connect(target).await?;
            let mut buf = [7u8; MESSAGE];
            let mut done = 0u64;
            while Instant::now() < end {
                exchange(&mut s, &mut buf).await?;
                done += 1;
            }
            Ok::<u64, std::io::Error>(done)
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await?.context("throughput connection")?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({ "requests": total, "seconds": secs, "rps": total as f64 / secs }))
}

async fn churn(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.conns {
        let target = args.target;
        tasks.push(tokio::spawn(async move {
            let mut buf = [7u8; MESSAGE];
            let (mut done, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                let ok = async {
                    let mut s = connect(target).await?;
                    exchange(&mut s, &mut buf).await
                }
                .await;
                if ok.is_ok() {
                    done += 1;
                } else {
                    errors += 1;
                }
            }
            (done, errors)
        }));
    }
    let started = Instant::now();
    let (mut total, mut errors) = (0, 0);
    for t in tasks {
        let (d, e) = t.await?;
        total += d;
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(
        json!({ "connections": total, "errors": errors, "seconds": secs, "cps": total as f64 / secs }),
    )
}

async fn idle(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    let mut held = Vec::with_capacity(args.conns);
    let mut buf = [7u8; MESSAGE];
    for i in 0..args.conns {
        let mut s = connect(args.target)
            .await
            .with_context(|| format!("idle connection {i}"))?;
        exchange(&mut s, &mut buf).await?;
        held.push(s);
    }
    // Tell the parent, then hold until it closes our stdin.
    println!("{}", json!({ "held": held.len() }));
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    })
    .await?;
    Ok(json!({ "held": held.len(), "done": true }))
}

async fn pauses(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    // One exchange as each opens, as a pool warms its connections: each
    // is through to the backend before the next.
    let mut conns = Vec::with_capacity(args.conns);
    let mut buf = [7u8; MESSAGE];
    for i in 0..args.conns {
        let mut s = connect(args.target)
            .await
            .with_context(|| format!("connection {i}"))?;
        exchange(&mut s, &mut buf)
            .await
            .with_context(|| format!("connection {i}'s first exchange"))?;
        conns.push(s);
    }
    println!("{}", json!({ "connected": conns.len() }));
    std::io::stdout().flush()?;
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let interval = Duration::from_millis(args.interval_ms);
    let spread = interval / args.conns.max(1) as u32;
    let mut tasks = Vec::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            // Spread over the interval, so the exchanges do not bunch.
            tokio::time::sleep(spread * i as u32).await;
            let mut buf = [7u8; MESSAGE];
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut errors = 0u64;
            while Instant::now() < end {
                let started = Instant::now();
                match exchange(&mut s, &mut buf).await {
                    Ok(()) => {
                        let us = started.elapsed().as_micros() as u64;
                        let _ = hist.record(us.max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        eprintln!("pauses: connection {i}: {e} after {} exchanges", hist.len());
                        break;
                    }
                }
                tokio::time::sleep(interval).await;
            }
            (hist, errors)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    Ok(json!({
        "exchanges": all.len(),
        "errors": errors,
        "p50_us": all.value_at_quantile(0.5),
        "p99_us": all.value_at_quantile(0.99),
        "max_us": all.max(),
    }))
}

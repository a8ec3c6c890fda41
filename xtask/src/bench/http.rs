//! `cargo xtask bench --http`: requests (issue 17). Real clients, wrk for
//! HTTP/1.1 keep-alive and h2load (nghttp2) for HTTP/2, against three nginx
//! backends, through Sluice's request path (`protocol: http` / `http2`),
//! Sluice's connection path (`tcp`), HAProxy in HTTP mode and nginx as an
//! HTTP proxy, and straight to one backend (the floor). Each proxy gets
//! one worker on CPU 0; the clients and the backends share CPU 1, as in
//! the main bench.
//!
//! For each path: latency of one connection's back-to-back requests (p50,
//! p99 from h2load's per-request log; added = over the floor's), requests
//! a second on 64 connections (wrk)
//! (HTTP/2: 8 connections of 10 streams) and the proxy's CPU per request
//! then, and how the requests of one keep-alive connection spread over the
//! three backends (each answers its name; a wrk script counts them).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sluice_testkit::{
    config::{CircuitBreakers, Endpoint, Service},
    port::free_port,
};

use super::{Proc, cpu_seconds, node, start_agent, wait_ready};
use crate::run as run_cmd;

/// The request path's target: its added p99 at most this share of
/// HAProxy's (HTTP mode).
const TARGET_P99_SHARE: f64 = 0.8;

/// Counts each answer's body (the backend's name) in every thread and
/// prints the totals as one JSON line at the end.
const SPREAD_LUA: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body)
  counts[body] = (counts[body] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do
    table.insert(parts, string.format('"%s": %d', k:gsub("%s+", ""), v))
  end
  io.write("SPREAD {" .. table.concat(parts, ", ") .. "}\n")
end
"#;

/// One way to the backends.
struct Way {
    name: &'static str,
    /// HTTP/1.1 and HTTP/2 addresses (None: the path has no HTTP/2).
    h1: SocketAddr,
    h2: Option<SocketAddr>,
    /// Through a Sluice agent: the client runs as its workload.
    meshed: bool,
    pid: Option<u32>,
}

struct Timing {
    seconds: f64,
    rounds: usize,
}

pub fn run(sluice: &Path, quick: bool) -> anyhow::Result<()> {
    crate::setup::ensure_packages(&["wrk", "nghttp2-client", "haproxy", "nginx-core"])?;
    let dir = crate::target_dir().join("bench-http");
    std::fs::create_dir_all(&dir)?;
    let timing = match quick {
        true => Timing {
            seconds: 1.0,
            rounds: 1,
        },
        false => Timing {
            seconds: 5.0,
            rounds: 3,
        },
    };
    let mut procs = Vec::new();
    let h1: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let h2: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    procs.push(backends(&dir, &h1, &h2)?);

    let config = dir.join("sluice.yaml");
    let state = dir.join("state");
    let mut one = node("bench-http", "sluice-bench-http", "http", &state)?;
    let endpoints = |ports: &[u16]| -> Vec<Endpoint> {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        ports.iter().map(|&p| Endpoint::new(at(p))).collect()
    };
    let service = |name: &str, vip: &str, ports: &[u16]| -> anyhow::Result<Service> {
        let breakers = CircuitBreakers {
            max_connections: Some(100_000),
            max_pending_connects: Some(100_000),
            max_pending_requests: Some(100_000),
        };
        Ok(Service::new(name, "bench", vip.parse()?, &[])
            .circuit_breakers(breakers)
            .endpoints(endpoints(ports)))
    };
    one.services = vec![
        service("pay-h1", "127.77.10.10:8080", &h1)?.protocol("http"),
        service("pay-h2", "127.77.10.11:8080", &h2)?.protocol("http2"),
        service("pay-l4", "127.77.10.12:8080", &h1)?,
    ];
    one.write(&config)?;
    if !state.join("ca/ca.pem").exists() {
        run_cmd(
            Command::new(sluice)
                .args(["ca", "init", "--config"])
                .arg(&config),
        )?;
    }
    procs.push(start_agent(sluice, &config, None, "sluice")?);
    wait_ready(sluice, &config, None)?;
    let sluice_pid = procs.last().map(Proc::pid);
    let (haproxy_h1, haproxy_h2) = (free_port()?, free_port()?);
    procs.push(haproxy(&dir, haproxy_h1, haproxy_h2, &h1, &h2)?);
    let haproxy_pid = procs.last().map(Proc::pid);
    let nginx_port = free_port()?;
    procs.push(nginx_proxy(&dir, nginx_port, &h1)?);
    let nginx_pid = procs.last().map(Proc::pid);
    std::thread::sleep(Duration::from_millis(300));

    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let ways = [
        Way {
            name: "direct",
            h1: local(h1[0]),
            h2: Some(local(h2[0])),
            meshed: false,
            pid: None,
        },
        Way {
            name: "sluice-l7",
            h1: "127.77.10.10:8080".parse()?,
            h2: Some("127.77.10.11:8080".parse()?),
            meshed: true,
            pid: sluice_pid,
        },
        Way {
            name: "sluice-l4",
            h1: "127.77.10.12:8080".parse()?,
            h2: None,
            meshed: true,
            pid: sluice_pid,
        },
        Way {
            name: "haproxy-http",
            h1: local(haproxy_h1),
            h2: Some(local(haproxy_h2)),
            meshed: false,
            pid: haproxy_pid,
        },
        Way {
            name: "nginx-http",
            h1: local(nginx_port),
            h2: None,
            meshed: false,
            pid: nginx_pid,
        },
    ];
    let run = Run {
        sluice,
        config: &config,
        dir: &dir,
        seconds: timing.seconds,
    };
    let mut rows: Vec<Value> = Vec::new();
    for round in 0..timing.rounds {
        for way in &ways {
            let mut row = json!({ "path": way.name, "round": round });
            row["h1"] = run.h1(way)?;
            if way.h2.is_some() {
                row["h2"] = run.h2(way)?;
            }
            println!("   {row}");
            rows.push(row);
        }
    }
    drop(procs);
    report(&rows, &ways, quick, &dir)
}

struct Run<'a> {
    sluice: &'a Path,
    config: &'a Path,
    dir: &'a Path,
    seconds: f64,
}

impl Run<'_> {
    /// `program args` on CPU 1, as the bench workload where `way` is
    /// meshed; its stdout.
    fn client(&self, way: &Way, program: &str, args: &[String]) -> anyhow::Result<String> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1"]);
        if way.meshed {
            cmd.arg(self.sluice)
                .args(["exec", "--workload", "bench", "--config"])
                .arg(self.config)
                .arg("--");
        }
        let out = cmd
            .arg(program)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!("{program} on {} failed ({})", way.name, out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wrk(
        &self,
        way: &Way,
        conns: usize,
        seconds: f64,
        extra: &[String],
    ) -> anyhow::Result<String> {
        let mut args = vec![
            "-t1".to_owned(),
            format!("-c{conns}"),
            format!("-d{}s", seconds.ceil() as u64),
            "--latency".into(),
        ];
        args.extend_from_slice(extra);
        args.push(format!("http://{}/", way.h1));
        self.client(way, "wrk", &args)
    }

    fn h1(&self, way: &Way) -> anyhow::Result<Value> {
        let (p50, p99) = self.one_connection(way, false)?;
        let cpu_before = way.pid.map(cpu_seconds);
        let loaded = self.wrk(way, 64, self.seconds, &[])?;
        let cpu = way.pid.zip(cpu_before).map(|(p, b)| cpu_seconds(p) - b);
        let script = self.dir.join("spread.lua");
        std::fs::write(&script, SPREAD_LUA)?;
        let spread_args = ["-s".to_owned(), script.display().to_string()];
        let spread = self.wrk(way, 1, 1.0, &spread_args)?;
        let requests = wrk_requests(&loaded)?;
        Ok(json!({
            "p50_us": p50,
            "p99_us": p99,
            "req_s": wrk_rate(&loaded)?,
            "cpu_us_per_req": cpu.map(|c| c * 1e6 / requests.max(1.0)),
            "spread": spread
                .lines()
                .find_map(|l| l.strip_prefix("SPREAD "))
                .and_then(|j| serde_json::from_str::<Value>(j).ok()),
        }))
    }

    /// p50 and p99 of one connection's back-to-back requests, from
    /// h2load's log of each request (`--h1`: HTTP/1.1 keep-alive). wrk's
    /// own percentiles are not used: on one connection they showed
    /// millisecond tails on every proxy that h2load's log does not.
    fn one_connection(&self, way: &Way, http2: bool) -> anyhow::Result<(f64, f64)> {
        let addr = match http2 {
            true => way.h2.expect("an HTTP/2 path"),
            false => way.h1,
        };
        let log = self.dir.join(format!("h2load-{}-{http2}.log", way.name));
        // h2load appends to its log: a log left by an earlier round (or
        // run) would be read again as this round's requests.
        match std::fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let n = (self.seconds * 4_000.0) as usize;
        let mut args = vec![
            format!("-n{n}"),
            "-c1".into(),
            "-m1".into(),
            format!("--log-file={}", log.display()),
        ];
        if !http2 {
            args.push("--h1".into());
        }
        args.push(format!("http://{addr}/"));
        self.client(way, "h2load", &args)?;
        let mut micros: Vec<f64> = std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        micros.sort_by(f64::total_cmp);
        if micros.is_empty() {
            bail!("h2load on {} logged no request", way.name);
        }
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
        Ok((at(0.50), at(0.99)))
    }

    fn h2(&self, way: &Way) -> anyhow::Result<Value> {
        let target = format!("http://{}/", way.h2.expect("an HTTP/2 path"));
        let (p50, p99) = self.one_connection(way, true)?;
        let cpu_before = way.pid.map(cpu_seconds);
        let loaded = self.client(
            way,
            "h2load",
            &[
                format!("-D{}", self.seconds.ceil() as u64),
                "-c8".into(),
                "-m10".into(),
                target,
            ],
        )?;
        let cpu = way.pid.zip(cpu_before).map(|(p, b)| cpu_seconds(p) - b);
        let (rate, done) = h2load_rate(&loaded)?;
        Ok(json!({
            "p50_us": p50,
            "p99_us": p99,
            "req_s": rate,
            "cpu_us_per_req": cpu.map(|c| c * 1e6 / done.max(1.0)),
        }))
    }
}

/// nginx on CPU 1: three HTTP/1.1 backends and three h2c ones, each
/// answering its name.
fn backends(dir: &Path, h1: &[u16], h2: &[u16]) -> anyhow::Result<Proc> {
    let mut servers = String::new();
    for (i, port) in h1.iter().enumerate() {
        servers += &format!(
            "server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"b{}\\n\"; }} }}\n",
            i + 1
        );
    }
    for (i, port) in h2.iter().enumerate() {
        servers += &format!(
            "server {{ listen 127.0.0.1:{port} http2; location / {{ return 200 \"b{}\\n\"; }} }}\n",
            i + 1
        );
    }
    nginx(dir, "backends", "1", &servers)
}

/// nginx as an HTTP proxy on CPU 0, keeping connections to the backends.
fn nginx_proxy(dir: &Path, port: u16, h1: &[u16]) -> anyhow::Result<Proc> {
    let upstreams: String = h1
        .iter()
        .map(|p| format!("server 127.0.0.1:{p};"))
        .collect();
    let servers = format!(
        "upstream pay {{ {upstreams} keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://pay; \
         proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n"
    );
    nginx(dir, "proxy", "0", &servers)
}

fn nginx(dir: &Path, name: &str, cpu: &str, servers: &str) -> anyhow::Result<Proc> {
    let conf = dir.join(format!("nginx-{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\nworker_rlimit_nofile 20000;\npid {dir}/nginx-{name}.pid;\n\
             error_log stderr error;\nevents {{ worker_connections 10000; }}\n\
             http {{ access_log off; keepalive_requests 1000000; tcp_nodelay on;\n{servers}}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", cpu, "nginx", "-c"])
        .arg(&conf)
        .args(["-g", "daemon off; master_process off;"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("start nginx ({name})"))?;
    Ok(Proc {
        child,
        name: format!("nginx-{name}"),
    })
}

/// HAProxy in HTTP mode on CPU 0, one thread: round robin over the
/// backends, connections to them reused.
fn haproxy(dir: &Path, port_h1: u16, port_h2: u16, h1: &[u16], h2: &[u16]) -> anyhow::Result<Proc> {
    let servers = |ports: &[u16], proto: &str| -> String {
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("  server s{i} 127.0.0.1:{p}{proto}\n"))
            .collect()
    };
    let cfg = dir.join("haproxy-http.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\n\ndefaults\n  mode http\n  timeout connect 1s\n  \
             timeout client 1h\n  timeout server 1h\n  http-reuse always\n\n\
             frontend h1\n  bind 127.0.0.1:{port_h1}\n  default_backend h1\n\
             frontend h2\n  bind 127.0.0.1:{port_h2} proto h2\n  default_backend h2\n\
             backend h1\n  balance roundrobin\n{}\
             backend h2\n  balance roundrobin\n{}",
            servers(h1, ""),
            servers(h2, " proto h2"),
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0", "haproxy", "-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .spawn()
        .context("start haproxy")?;
    Ok(Proc {
        child,
        name: "haproxy-http".into(),
    })
}

fn wrk_rate(out: &str) -> anyhow::Result<f64> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .with_context(|| format!("no rate in wrk's output: {out}"))?;
    Ok(v.trim().parse()?)
}

/// `N requests in Xs`: N.
fn wrk_requests(out: &str) -> anyhow::Result<f64> {
    let line = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .with_context(|| format!("no count in wrk's output: {out}"))?;
    Ok(line.split_whitespace().next().unwrap_or("0").parse()?)
}

/// h2load's `finished in 5.00s, 12345.67 req/s, ...` and `requests: N
/// total, N started, N done, N succeeded, ...`: the rate and the
/// succeeded count.
fn h2load_rate(out: &str) -> anyhow::Result<(f64, f64)> {
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("no rate in h2load's output: {out}"))?;
    let succeeded = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find(|p| p.ends_with(" succeeded")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no count in h2load's output: {out}"))?;
    if succeeded == 0.0 {
        bail!("h2load: no request succeeded: {out}");
    }
    Ok((rate, succeeded))
}

/// The median over rounds of `field` of `proto` for `path`.
fn median(rows: &[Value], path: &str, proto: &str, field: &str) -> Option<f64> {
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r["path"] == path)
        .filter_map(|r| r[proto][field].as_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn report(rows: &[Value], ways: &[Way], quick: bool, dir: &Path) -> anyhow::Result<()> {
    let out: PathBuf = dir.join("http.json");
    std::fs::write(&out, serde_json::to_string_pretty(rows)?)?;
    for (proto, title) in [
        ("h1", "HTTP/1.1 keep-alive (wrk)"),
        ("h2", "HTTP/2 h2c (h2load)"),
    ] {
        println!(
            "\n{title}: one connection's p50/p99 and added over direct; 64 connections (h2: 8 x 10 streams) for req/s and CPU"
        );
        println!(
            "{:<14} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10}  spread",
            "path", "p50 us", "p99 us", "+p50 us", "+p99 us", "req/s", "CPU us/req"
        );
        let floor50 = median(rows, "direct", proto, "p50_us").unwrap_or(0.0);
        let floor99 = median(rows, "direct", proto, "p99_us").unwrap_or(0.0);
        for way in ways.iter().filter(|w| proto == "h1" || w.h2.is_some()) {
            let m = |f| median(rows, way.name, proto, f);
            let (Some(p50), Some(p99)) = (m("p50_us"), m("p99_us")) else {
                continue;
            };
            let spread = rows
                .iter()
                .rev()
                .find(|r| r["path"] == way.name)
                .map(|r| r[proto]["spread"].to_string())
                .filter(|s| s != "null")
                .unwrap_or_default();
            println!(
                "{:<14} {:>9.0} {:>9.0} {:>10.0} {:>10.0} {:>9.0} {:>10}  {spread}",
                way.name,
                p50,
                p99,
                p50 - floor50,
                p99 - floor99,
                m("req_s").unwrap_or(0.0),
                m("cpu_us_per_req").map_or("-".into(), |c| format!("{c:.1}")),
            );
        }
        let added = |path| median(rows, path, proto, "p99_us").map(|p| p - floor99);
        if let (Some(l7), Some(haproxy)) = (added("sluice-l7"), added("haproxy-http")) {
            let share = l7 / haproxy.max(1.0);
            println!(
                "sluice-l7 added p99 / haproxy-http's: {share:.2} (target <= {TARGET_P99_SHARE}){}",
                if quick {
                    " [quick run: not a measurement]"
                } else {
                    ""
                }
            );
        }
    }
    println!("\nrows: {}", out.display());
    // Every path must have carried requests, also in a quick run.
    for way in ways {
        if median(rows, way.name, "h1", "req_s").unwrap_or(0.0) <= 0.0 {
            bail!("{} carried no HTTP/1.1 request", way.name);
        }
    }
    Ok(())
}

//! Network namespaces standing for nodes and pods: made with `ip netns`,
//! removed on drop; processes and threads entered into them with setns(2),
//! which changes the network namespace alone (`ip netns exec` also
//! remounts /sys, and with it cgroupfs and bpffs).

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use crate::shell::{CommandFailed, sh};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace with its loopback up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes namespace `name` and brings its loopback up. On error nothing
    /// is left behind.
    pub fn create(name: &str) -> Result<Netns, CommandFailed> {
        sh(&format!("ip netns add {name}"))?;
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Its name, for `ip -n NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for setns(2) and for configs (`netns:`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandFailed> {
        sh(&format!("ip -n {} {}", self.name, args.join(" ")))
    }

    /// Makes `cmd`'s child run inside this namespace.
    pub fn enter_on_exec(&self, cmd: &mut Command) -> io::Result<()> {
        enter_on_exec(cmd, &self.path())
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets it
    /// creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(self.path(), f)
    }

    /// Like [`Self::run`], in the background.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        spawn_in(self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sh(&format!("ip netns del {}", self.name)) {
            eprintln!("test kit: {e}");
        }
    }
}

/// A veth pair joining `a` (interface `a_if`) and `b` (interface `b_if`),
/// both ends made inside their namespaces and brought up: no end ever
/// exists in this namespace, so nothing can be left behind here, and the
/// names need only be unique within each namespace. The pair goes when
/// either namespace does.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), CommandFailed> {
    sh(&format!(
        "ip link add {a_if} netns {an} type veth peer name {b_if} netns {bn}",
        an = a.name,
        bn = b.name
    ))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Makes `cmd`'s child enter the network namespace at `path` (a bind mount
/// or `/proc/PID/ns/net`) before it execs.
pub fn enter_on_exec(cmd: &mut Command, path: &Path) -> io::Result<()> {
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    // SAFETY: setns(2) is async-signal-safe; the fd stays open because the
    // closure owns the file.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered the namespace at `path`.
pub fn run_in<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in(path, f).join() {
        Ok(t) => t,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`run_in`], in the background. The thread panics if it cannot
/// enter the namespace.
pub fn spawn_in<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::spawn(move || {
        let file =
            File::open(&path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
        // SAFETY: setns(2) on this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        f()
    })
}

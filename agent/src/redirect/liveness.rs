//! The kill window. A killed agent's outbound listener outlives it for as
//! long as the kernel takes to tear the process down (a few to a hundred
//! milliseconds); a connect redirected there meanwhile is reset, where the
//! service's `on_agent_down` promised to go around the agent or refuse.
//! Two tracepoint programs mark the serving agent killed in [`AGENT_LIFE`]
//! the moment a SIGKILL is generated for it (`signal/signal_generate`) or
//! its main thread exits (`sched/sched_process_exit`), and the connect
//! hook then takes the `on_agent_down` path at once.
//!
//! The tracepoints need tracefs; one that is not mounted is mounted at
//! /sys/kernel/tracing (in the agent's own mount namespace, under a
//! container). Without them the agent still runs, and the window stays
//! open: a warning says so.
//!
//! Their links are pinned (`tracepoint_<program>_<link id>` in the pin
//! directory) and the agent keeps no descriptor of them: taking a program
//! off a tracepoint waits for an RCU-tasks grace period, seconds on a busy
//! node, and a process that closed the last descriptor at its exit would
//! wait that long to end. An unlinked pin is released by the kernel in the
//! background instead. So each agent pins its own, then unpins those of
//! earlier agents (whose processes hold nothing); a stop unpins all.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{TracePoint, links::FdLink},
};
use log::warn;
use sluice_maps::{AGENT_LIFE, AgentLife, SIGNAL_GENERATE_PID_OFFSET, SIGNAL_GENERATE_SIG_OFFSET};

use super::{RedirectError, map_err, take_map};

const TRACEFS: &str = "/sys/kernel/tracing";
/// (program, category, tracepoint).
const TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("sluice_agent_signal", "signal", "signal_generate"),
    ("sluice_agent_exit", "sched", "sched_process_exit"),
];

/// Which agent process serves the node, as the connect hook sees it.
pub struct Liveness {
    life: Array<MapData, AgentLife>,
}

impl Liveness {
    /// Takes the map and attaches the tracepoints, pinned in `pin_dir`;
    /// those earlier agents pinned there are let go.
    pub(super) fn attach(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Liveness, RedirectError> {
        let life = Array::try_from(take_map(ebpf, AGENT_LIFE)?).map_err(map_err(AGENT_LIFE))?;
        if let Err(why) = watch(ebpf, pin_dir) {
            warn!(
                "a killed agent's connects are not told apart from a live one's ({why}): \
                 connects made while a killed agent is torn down are reset instead of \
                 taking on_agent_down"
            );
        }
        Ok(Liveness { life })
    }

    /// Makes process `tgid` (this one) the serving agent, not killed.
    pub fn serve_as(&mut self, tgid: u32) -> Result<(), RedirectError> {
        self.life
            .set(0, AgentLife { tgid, killed: 0 }, 0)
            .map_err(map_err(AGENT_LIFE))
    }
}

fn watch(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), String> {
    mount_tracefs()?;
    check_signal_format()?;
    let mut ours = Vec::new();
    for (name, category, tracepoint) in TRACEPOINTS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name} in the object"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        program.load().map_err(|e| format!("{name}: {e}"))?;
        let attach = |program: &mut TracePoint| {
            program
                .attach(category, tracepoint)
                .map_err(|e| format!("{name} on {category}/{tracepoint}: {e}"))
        };
        let link = attach(program)?;
        let pinned = program
            .take_link(link)
            .map_err(|e| e.to_string())
            .and_then(|link| FdLink::try_from(link).map_err(|e| e.to_string()))
            .and_then(|link| {
                // The kernel's id for the link: unique, where a pid is not
                // (every agent may be pid 1 in its container).
                let id = link.info().map_err(|e| e.to_string())?.id();
                let file = format!("{PIN_PREFIX}{name}_{id}");
                let path = pin_dir.join(&file);
                let pinned = link
                    .pin(&path)
                    .map_err(|e| format!("{}: {e}", path.display()));
                ours.push(file);
                pinned
            });
        match pinned {
            // The pin holds the link; this process, nothing.
            Ok(pinned) => drop(pinned),
            // A kernel without links for tracepoints: attached as before,
            // detached when this process ends.
            Err(why) => {
                warn!(
                    "{name} stays attached only while this agent runs: it cannot be pinned ({why})"
                );
                attach(program)?;
            }
        }
    }
    unpin_tracepoints(pin_dir, &ours);
    Ok(())
}

/// How the pinned tracepoint links' names begin.
const PIN_PREFIX: &str = "tracepoint_";

/// Unpins the tracepoint links pinned in `pin_dir`, but those named in
/// `keep`.
pub(super) fn unpin_tracepoints(pin_dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(PIN_PREFIX) || keep.iter().any(|k| *k == name) {
            continue;
        }
        if let Err(e) = std::fs::remove_file(entry.path()) {
            warn!("cannot unpin {}: {e}", entry.path().display());
        }
    }
}

/// Mounts tracefs at [`TRACEFS`] unless it (or the debugfs path) is there.
fn mount_tracefs() -> Result<(), String> {
    let populated =
        |path: &str| std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some());
    if populated(TRACEFS) || populated("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS).expect("no NUL");
    let fstype = std::ffi::CString::new("tracefs").expect("no NUL");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "tracefs is not mounted and cannot be mounted at {TRACEFS}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The program reads the signal and the target's pid at fixed offsets:
/// refuse to attach on a kernel whose record differs.
fn check_signal_format() -> Result<(), String> {
    let path = Path::new(TRACEFS).join("events/signal/signal_generate/format");
    let format = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for (field, offset) in [
        ("int sig;", SIGNAL_GENERATE_SIG_OFFSET),
        ("pid_t pid;", SIGNAL_GENERATE_PID_OFFSET),
    ] {
        let expected = format!("field:{field}\toffset:{offset};");
        if !format.contains(&expected) {
            return Err(format!(
                "{} does not have `{field}` at offset {offset}",
                path.display()
            ));
        }
    }
    Ok(())
}

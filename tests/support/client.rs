//! This test binary is also the test client (the kit's `client`): started
//! with `SLUICE_TEST_CLIENT` set, it runs the client before the test
//! harness's main and exits. A client has to be a process of its own, in
//! the workload's cgroup, for the hooks to catch its connects; being this
//! binary, it is always built with the tests and needs nothing installed.

use std::{
    ffi::{CStr, OsString, c_char, c_int},
    io::{BufRead, BufReader, Lines, Write},
    process::{ChildStdin, ChildStdout, Command, Stdio},
};

use sluice_testkit::{
    client::{CLIENT_VAR, Client},
    process::{ChildGuard, SpawnGuarded},
};

/// Runs the client when this process was started as one. glibc calls the
/// functions of `.init_array` with main's arguments, before main.
extern "C" fn client_entry(argc: c_int, argv: *const *const c_char, _env: *const *const c_char) {
    if std::env::var_os(CLIENT_VAR).is_none() {
        return;
    }
    let args: Vec<String> = (1..usize::try_from(argc).unwrap_or(0))
        // SAFETY: argv holds argc NUL-terminated strings.
        .map(|i| unsafe { CStr::from_ptr(*argv.add(i)) })
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    std::process::exit(sluice_testkit::client::run(&args));
}

#[used]
#[unsafe(link_section = ".init_array")]
static CLIENT_ENTRY: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    client_entry;

/// The command line that runs `client` (this binary, as the client),
/// killed after `seconds` so that a broken redirect fails the test instead
/// of hanging it. The process needs [`CLIENT_VAR`] in its environment.
pub fn argv(client: &Client, seconds: u32) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "timeout".into(),
        "--signal=KILL".into(),
        seconds.to_string().into(),
        std::env::current_exe()
            .expect("the test binary's path")
            .into(),
    ];
    argv.extend(client.args().into_iter().map(OsString::from));
    argv
}

/// `client` as a command of its own (see [`argv`]).
pub fn command(client: &Client, seconds: u32) -> Command {
    let argv = argv(client, seconds);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env(CLIENT_VAR, "1");
    cmd
}

/// A connection that a client process holds open ([`Client::Hold`]).
pub struct Held {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    replies: Lines<BufReader<ChildStdout>>,
}

impl Held {
    /// Starts `cmd`, a command that runs a [`Client::Hold`].
    pub fn start(mut cmd: Command) -> Held {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn_guarded()
            .expect("start the client");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        Held {
            child,
            stdin,
            replies: BufReader::new(stdout).lines(),
        }
    }

    /// Sends `line` on the connection; the reply, `FAILED` when there was
    /// none, or an empty string once the client has ended.
    pub fn ask(&mut self, line: &str) -> String {
        let Some(stdin) = self.stdin.as_mut() else {
            return String::new();
        };
        if writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return String::new();
        }
        self.replies.next().and_then(Result::ok).unwrap_or_default()
    }

    /// Closes the connection and waits for the client to end.
    pub fn close(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

//! Child processes that cannot outlive the test that started them.

use std::{
    io,
    ops::{Deref, DerefMut},
    process::{Child, Command, Output},
};

/// A child process that is killed (SIGKILL) and reaped on drop, unless it
/// was waited for. A test that fails while a client or server runs leaves
/// no process behind.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Waits for the process to end, collecting what it wrote to piped
    /// stdout and stderr.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        self.take().wait_with_output()
    }

    /// Hands the process over: it is no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.take()
    }

    fn take(&mut self) -> Child {
        self.child.take().expect("the child is there until taken")
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("the child is there until taken")
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is there until taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `spawn` that returns a [`ChildGuard`].
pub trait SpawnGuarded {
    /// Starts the command; the process is killed if the guard drops first.
    fn spawn_guarded(&mut self) -> io::Result<ChildGuard>;
}

impl SpawnGuarded for Command {
    fn spawn_guarded(&mut self) -> io::Result<ChildGuard> {
        Ok(ChildGuard {
            child: Some(self.spawn()?),
        })
    }
}

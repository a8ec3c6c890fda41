//! A request's wait for its caller's first HTTP/2 connection to an
//! endpoint that another request opens, and the opener's turn.

use super::{EndpointPool, NotTaken, OPENING, Sender};
use crate::tls::Identity;

impl EndpointPool {
    /// [`EndpointPool::take`], waiting meanwhile for the caller's first
    /// connection that another request opens, until it is shared or
    /// fails (at most [`OPENING`], or until `deadline`). Otherwise the
    /// request opens one and [`Opening::share`]s it; an [`Opening`]
    /// dropped unshared (the connect failed, or the request went away)
    /// wakes those waiting, and the next of them opens one.
    pub async fn take_or_wait<'a>(
        &'a self,
        http2: bool,
        owner: Option<&'a Identity>,
        most: Option<u32>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Sender, Opening<'a>> {
        loop {
            match self.take(http2, owner, most) {
                Ok(sender) => return Ok(sender),
                Err(NotTaken::Open) => {
                    return Err(Opening {
                        pool: self,
                        owner,
                        http2,
                    });
                }
                Err(NotTaken::Wait(opened)) => {
                    let until = tokio::time::Instant::now() + OPENING;
                    let until = deadline.map_or(until, |d| d.min(until));
                    // Boxed: a rare wait, whose timer would otherwise
                    // take space in every request's future.
                    let _ = Box::pin(tokio::time::timeout_at(until, opened)).await;
                }
            }
        }
    }

    /// The HTTP/2 connection of `owner`'s that a request opened (told
    /// [`NotTaken::Open`]) did not open: the next request opens one.
    fn not_opened(&self, owner: Option<&Identity>) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.done_opening(owner) {
            self.opened.notify_waiters();
        }
    }
}

/// A request's turn to open a connection to the endpoint for its caller
/// (no open one could take it). For HTTP/2, the caller's other requests
/// wait for it meanwhile: [`Opening::share`] gives them the connection;
/// dropped without, it lets them go on (the next opens one).
pub struct Opening<'a> {
    pool: &'a EndpointPool,
    owner: Option<&'a Identity>,
    http2: bool,
}

impl Opening<'_> {
    /// The new connection is open: see [`EndpointPool::share`].
    pub fn share(self, sender: &Sender, most: Option<u32>) {
        self.pool.share(sender, self.owner, most);
        // Shared: nothing is left to say on drop.
        std::mem::forget(self);
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.http2 {
            self.pool.not_opened(self.owner);
        }
    }
}

//! The lot where a paused tunnelled connection waits, under its pause's
//! token, for the stream that takes it up.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use tokio::sync::oneshot;

use super::TunnelEnd;
use crate::{
    tls::Identity,
    tunnel::{TunnelStream, control::Token},
};

/// Who may take up a paused connection.
struct Waiting {
    caller: Identity,
    asked_for: Identity,
    target: SocketAddr,
    take_up: oneshot::Sender<TunnelStream>,
}

/// Paused connections by token.
#[derive(Default)]
pub struct Parked {
    // Taken only at a peer's upgrade, never per connection.
    lot: Mutex<HashMap<Token, Waiting>>,
    /// A connection was parked (for a stream that came first).
    arrived: tokio::sync::Notify,
}

/// How long a stream with a token waits for its paused connection to be
/// parked: when both agents leave at once, the peer's successor can ask
/// before this agent's successor has the connection from its predecessor.
pub const CLAIM_WAIT: Duration = Duration::from_secs(2);

/// Why a stream cannot take up a paused connection.
#[derive(Debug, thiserror::Error)]
pub enum NotTakenUp {
    #[error("no paused connection has this token (unknown, taken, or expired)")]
    Unknown,
    /// The paused connection's parties, which the stream's are not.
    #[error("the paused connection is {0}; this stream is not")]
    Mismatch(String),
}

impl Parked {
    fn lot(&self) -> std::sync::MutexGuard<'_, HashMap<Token, Waiting>> {
        self.lot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn park(&self, token: Token, end: &TunnelEnd) -> oneshot::Receiver<TunnelStream> {
        let (take_up, taken) = oneshot::channel();
        let waiting = Waiting {
            caller: end.remote().clone(),
            asked_for: end.local().clone(),
            target: end.target,
            take_up,
        };
        self.lot().insert(token, waiting);
        self.arrived.notify_waiters();
        taken
    }

    /// Takes `token`'s connection out of the lot; false when a stream has
    /// claimed it already, whose take-up is then on its way and must be
    /// awaited (dropping it would reset a stream already answered 200).
    pub(super) fn unpark(&self, token: &Token) -> bool {
        self.lot().remove(token).is_some()
    }

    /// Stops waiting for `token`'s stream (`successor`, as
    /// [`Parked::park`] gave it): none if the connection was still
    /// parked; else the stream a claim already took it up with.
    pub(super) async fn give_up(
        &self,
        token: &Token,
        successor: &mut oneshot::Receiver<TunnelStream>,
    ) -> Option<TunnelStream> {
        match self.unpark(token) {
            true => None,
            false => successor.await.ok(),
        }
    }

    /// The paused connection of `token`, for a stream from `caller` that
    /// asked for `asked_for` and names `target`. A stream that does not
    /// match leaves the connection parked for the right one.
    pub fn claim(
        &self,
        token: &Token,
        caller: &Identity,
        asked_for: Option<&Identity>,
        target: SocketAddr,
    ) -> Result<oneshot::Sender<TunnelStream>, NotTakenUp> {
        let mut lot = self.lot();
        let waiting = lot.get(token).ok_or(NotTakenUp::Unknown)?;
        if waiting.caller != *caller
            || asked_for != Some(&waiting.asked_for)
            || waiting.target != target
        {
            return Err(NotTakenUp::Mismatch(format!(
                "{}'s to {} at {}",
                waiting.caller, waiting.asked_for, waiting.target
            )));
        }
        Ok(lot.remove(token).expect("looked up above").take_up)
    }

    /// [`Parked::claim`], waiting up to [`CLAIM_WAIT`] for a token that is
    /// not parked yet.
    pub async fn claim_soon(
        &self,
        token: &Token,
        caller: &Identity,
        asked_for: Option<&Identity>,
        target: SocketAddr,
    ) -> Result<oneshot::Sender<TunnelStream>, NotTakenUp> {
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match self.claim(token, caller, asked_for, target) {
                Err(NotTakenUp::Unknown) => {
                    if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                        return Err(NotTakenUp::Unknown);
                    }
                }
                claimed => return claimed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{super::Parties, *};

    #[test]
    fn only_the_paused_connections_parties_take_it_up_and_only_once() {
        let id = |sa: &str| Identity::new("cluster.local", "payments", sa);
        let parked = Parked::default();
        let target: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let end = TunnelEnd {
            parties: Parties::Called(Arc::new((id("ledger"), id("checkout")))),
            target,
        };
        let token = Token([9; 16]);
        let _waiting = parked.park(token, &end);
        let (checkout, ledger) = (id("checkout"), id("ledger"));
        let other: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        for (caller, asked_for, to) in [
            (id("batch"), Some(&ledger), target),
            (checkout.clone(), Some(&checkout), target),
            (checkout.clone(), None, target),
            (checkout.clone(), Some(&ledger), other),
        ] {
            let refused = parked.claim(&token, &caller, asked_for, to).err();
            assert!(
                matches!(refused, Some(NotTakenUp::Mismatch(_))),
                "{caller} asking for {asked_for:?} at {to}: {refused:?}"
            );
        }
        let guessed = parked.claim(&Token([8; 16]), &checkout, Some(&ledger), target);
        assert!(matches!(guessed, Err(NotTakenUp::Unknown)));
        assert!(
            parked
                .claim(&token, &checkout, Some(&ledger), target)
                .is_ok()
        );
        let again = parked.claim(&token, &checkout, Some(&ledger), target);
        assert!(matches!(again, Err(NotTakenUp::Unknown)), "taken once");
    }
}

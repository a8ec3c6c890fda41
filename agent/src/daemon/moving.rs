//! Open connections across an upgrade: the old agent sends what its
//! handlers suspended to the new one, which carries each on. The wire is
//! the handover stream's step 4; what a connection is and how it goes on
//! is [`crate::proxy::moved`]'s.

use std::sync::Arc;

use log::{info, warn};
use tokio::sync::{mpsc, oneshot};

use crate::{
    drain::DrainWatch,
    handover::{MAX_BATCH, Predecessor, Successor},
    proxy::{
        ProxyInputs,
        moved::{self, Moved},
    },
};

/// Sends the connections the handlers suspend, as they come, until
/// `finish` (every handler is done: each connection moved or ended), then
/// the rest and `DONE`. Returns how many went.
pub(super) async fn send(
    successor: Successor,
    mut outbox: mpsc::UnboundedReceiver<Moved>,
    mut finish: oneshot::Receiver<()>,
) -> usize {
    let mut successor = Some(successor);
    let mut sent = 0;
    loop {
        let mut batch = Vec::new();
        let last = tokio::select! {
            _ = outbox.recv_many(&mut batch, MAX_BATCH) => false,
            _ = &mut finish => {
                while let Ok(m) = outbox.try_recv() {
                    batch.push(m);
                }
                true
            }
        };
        let mut chunks = Vec::new();
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(MAX_BATCH));
            chunks.push(std::mem::replace(&mut batch, rest));
        }
        for chunk in chunks {
            let n = chunk.len();
            let Some(mut to) = successor.take() else {
                // The stream failed: what is left is closed here.
                continue;
            };
            let packed = moved::pack(chunk);
            let result = tokio::task::spawn_blocking(move || to.send(&packed).map(|()| to)).await;
            match result {
                Ok(Ok(to)) => {
                    successor = Some(to);
                    sent += n;
                }
                Ok(Err(e)) => warn!("upgrade: cannot send {n} connections to the new agent: {e}"),
                Err(e) => warn!("upgrade: the sending thread failed: {e}"),
            }
        }
        if last {
            break;
        }
    }
    if let Some(to) = successor {
        let said = tokio::task::spawn_blocking(move || to.done()).await;
        if !matches!(said, Ok(Ok(()))) {
            warn!("upgrade: cannot tell the new agent the connections are all sent: {said:?}");
        }
    }
    sent
}

/// Receives the previous agent's open connections on a thread of its own
/// and carries each on, counted by `watch` like the ones accepted here.
pub(super) fn receive(predecessor: Predecessor, inputs: Arc<ProxyInputs>, watch: DrainWatch) {
    let runtime = tokio::runtime::Handle::current();
    let receiving = move || {
        let mut predecessor = predecessor;
        let mut received = 0;
        loop {
            match predecessor.receive() {
                Ok(Some(batch)) => match moved::unpack(batch) {
                    Ok(connections) => {
                        received += connections.len();
                        for m in connections {
                            let guard = watch.track();
                            runtime.spawn(moved::resume(inputs.clone(), m, guard));
                        }
                    }
                    Err(e) => warn!("upgrade: a batch of connections from the previous agent: {e}"),
                },
                Ok(None) => {
                    info!("upgrade: {received} open connections taken over");
                    return;
                }
                Err(e) => {
                    warn!(
                        "upgrade: {received} open connections taken over, then the previous \
                         agent's stream failed: {e}"
                    );
                    return;
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("sluice-takeover".into())
        .spawn(receiving)
    {
        warn!("upgrade: cannot start receiving the open connections: {e}");
    }
}

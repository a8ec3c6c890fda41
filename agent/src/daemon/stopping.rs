//! The end of a run: no new connections; the open ones move to the
//! successor (an upgrade) or drain; then the admin API goes.

use std::{sync::Arc, time::Duration};

use log::{error, info, warn};

use super::{Exit, captures::CaptureSet, moving, pods::PodListeners, start::DataPlane};
use crate::{
    drain::{self, DrainTrigger},
    handover::Successor,
    proxy::ProxyInputs,
};

/// How long the tunnel connections get to write their last frames.
const TUNNELS_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// The end of a run: stop accepting, drain what is open, then let the
/// admin API go.
pub(super) struct Stopping {
    pub(super) exit: Exit,
    pub(super) trigger: DrainTrigger,
    pub(super) admin_trigger: DrainTrigger,
    pub(super) pods: PodListeners,
    pub(super) captures: CaptureSet,
    pub(super) data_plane: DataPlane,
    pub(super) deadline: crate::config::HumanDuration,
    /// Where the open connections go, after a handover.
    pub(super) successor: Option<Successor>,
    pub(super) inputs: Arc<ProxyInputs>,
}

impl Stopping {
    pub(super) async fn drain(self) {
        if self.exit == Exit::HandedOver {
            // The successor answers on the same admin and metrics sockets.
            self.admin_trigger.start();
        }
        match &self.successor {
            Some(_) => info!(
                "upgrade: no new connections; handing {} open ones over (those that cannot \
                 move drain, up to {})",
                self.trigger.active(),
                self.deadline
            ),
            None => info!(
                "stopping: no new connections; draining {} open (up to {})",
                self.trigger.active(),
                self.deadline
            ),
        }
        // A stop refuses new connects at once; an upgrade leaves the
        // sockets listening for the successor.
        let refuse = self.exit == Exit::Stopped;
        let listeners = || {
            std::iter::once(&self.trigger)
                .chain(self.pods.triggers())
                .chain(self.captures.triggers())
        };
        for trigger in listeners() {
            trigger.stop(refuse);
        }
        for (name, task) in self.data_plane.servers {
            if let Err(e) = task.await {
                error!("{name} listener task failed: {e}");
            }
        }
        // Each movable connection suspends and is sent on; its handler
        // ends, so the wait below ends once all have moved.
        // (A successor of the version before takes the sockets only.)
        let moving = self
            .successor
            .filter(Successor::takes_connections)
            .and_then(|successor| {
                let outbox = self.inputs.connections.take_outbox()?;
                self.inputs.connections.start_moving();
                let (finish, finished) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(moving::send(successor, outbox, finished));
                Some((finish, task))
            });
        let deadline = self.deadline.0;
        let left = drain::wait_idle_all(listeners(), deadline).await;
        if let Some((finish, task)) = moving {
            let _ = finish.send(());
            match task.await {
                Ok(sent) => info!("upgrade: {sent} open connections handed over"),
                Err(e) => error!("upgrade: sending the open connections failed: {e}"),
            }
        }
        // A moved tunnelled connection's last frames (its END_STREAM) must
        // reach the peer agent before this process ends.
        if let Some(tunnels) = self.inputs.tunnels.get() {
            let open = tunnels.close(TUNNELS_CLOSE_WITHIN).await;
            if open > 0 {
                warn!("{open} tunnel connections did not close in time; cut");
            }
        }
        self.admin_trigger.start();
        if left > 0 {
            warn!("drain deadline passed with {left} connections open; closing them");
        } else if self.exit == Exit::HandedOver {
            info!("drained; the new agent has taken over");
        } else {
            info!("drained; detaching");
        }
    }
}

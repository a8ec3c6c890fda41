//! Metrics of the pooled tunnels between agents.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Which end of a tunnel connection this agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This agent opened it for its workloads.
    Client,
    /// A peer agent opened it to this one.
    Server,
}

impl Side {
    const ALL: [Side; 2] = [Side::Client, Side::Server];

    fn label(self) -> SideLabel {
        SideLabel {
            side: match self {
                Side::Client => "client",
                Side::Server => "server",
            },
        }
    }
}

/// The pooled tunnels between agents, for each side.
#[derive(Debug)]
pub struct TunnelMetrics {
    /// Tunnel connections made: one TLS handshake each, full or resumed.
    connections_opened: Family<HandshakeLabels, Counter>,
    connections_open: Family<SideLabel, Gauge>,
    /// Application connections carried as streams, by [`Side`]: handles
    /// kept, so that counting a stream takes no lock of the family.
    streams_opened: [Counter; 2],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: &'static str,
    /// `full` or `resumed` (a TLS 1.3 ticket from an earlier connection).
    handshake: &'static str,
}

impl TunnelMetrics {
    /// The families, every label at 0, registered in `registry`.
    pub(super) fn new(registry: &mut Registry) -> TunnelMetrics {
        let connections_opened = Family::<HandshakeLabels, Counter>::default();
        let connections_open = Family::<SideLabel, Gauge>::default();
        let streams = Family::<SideLabel, Counter>::default();
        for side in Side::ALL {
            for handshake in ["full", "resumed"] {
                let labels = HandshakeLabels {
                    side: side.label().side,
                    handshake,
                };
                drop(connections_opened.get_or_create(&labels));
            }
            drop(connections_open.get_or_create(&side.label()));
        }
        let streams_opened = Side::ALL.map(|side| streams.get_or_create(&side.label()).clone());
        registry.register(
            "sluice_tunnel_connections_opened",
            "Tunnel connections between agents made, by side and TLS handshake (full or resumed)",
            connections_opened.clone(),
        );
        registry.register(
            "sluice_tunnel_connections",
            "Tunnel connections between agents open now, by side",
            connections_open.clone(),
        );
        registry.register(
            "sluice_tunnel_streams_opened",
            "Application connections carried as streams of a tunnel connection, by side",
            streams,
        );
        TunnelMetrics {
            connections_opened,
            connections_open,
            streams_opened,
        }
    }

    /// Counts a tunnel connection made; the gauge goes down when the
    /// returned guard is dropped.
    pub fn connection(&self, side: Side, resumed: bool) -> OpenTunnel {
        let handshake = if resumed { "resumed" } else { "full" };
        self.connections_opened
            .get_or_create(&HandshakeLabels {
                side: side.label().side,
                handshake,
            })
            .inc();
        let open = self.connections_open.get_or_create(&side.label()).clone();
        open.inc();
        OpenTunnel(open)
    }

    /// Tunnel connections open now on `side`.
    pub fn open(&self, side: Side) -> i64 {
        self.connections_open.get_or_create(&side.label()).get()
    }

    /// Counts an application connection carried as a stream.
    pub fn stream_opened(&self, side: Side) {
        self.streams_opened[side as usize].inc();
    }
}

/// Keeps a tunnel connection counted as open.
#[derive(Debug)]
pub struct OpenTunnel(Gauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

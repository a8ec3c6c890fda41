//! Metrics of the pooled tunnels between agents.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// The pooled tunnels between agents, for each side (`client`: this agent
/// opens them for its workloads; `server`: peers open them to this one).
#[derive(Debug, Clone, Default)]
pub struct TunnelMetrics {
    /// Tunnel connections made: one TLS handshake each, full or resumed.
    pub connections_opened: Family<HandshakeLabels, Counter>,
    pub connections_open: Family<SideLabel, Gauge>,
    /// Application connections carried as streams.
    pub streams_opened: Family<SideLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabel {
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub side: &'static str,
    /// `full` or `resumed` (a TLS 1.3 ticket from an earlier connection).
    pub handshake: &'static str,
}

impl TunnelMetrics {
    pub const CLIENT: SideLabel = SideLabel { side: "client" };
    pub const SERVER: SideLabel = SideLabel { side: "server" };

    pub(super) fn register(&self, registry: &mut Registry) {
        for side in [Self::CLIENT, Self::SERVER] {
            for handshake in ["full", "resumed"] {
                let labels = HandshakeLabels {
                    side: side.side,
                    handshake,
                };
                drop(self.connections_opened.get_or_create(&labels));
            }
            drop(self.connections_open.get_or_create(&side));
            drop(self.streams_opened.get_or_create(&side));
        }
        registry.register(
            "sluice_tunnel_connections_opened",
            "Tunnel connections between agents made, by side and TLS handshake (full or resumed)",
            self.connections_opened.clone(),
        );
        registry.register(
            "sluice_tunnel_connections",
            "Tunnel connections between agents open now, by side",
            self.connections_open.clone(),
        );
        registry.register(
            "sluice_tunnel_streams_opened",
            "Application connections carried as streams of a tunnel connection, by side",
            self.streams_opened.clone(),
        );
    }

    /// Counts a tunnel connection made; the gauge goes down when the
    /// returned guard is dropped.
    pub fn connection(&self, side: SideLabel, resumed: bool) -> OpenTunnel {
        let handshake = if resumed { "resumed" } else { "full" };
        self.connections_opened
            .get_or_create(&HandshakeLabels {
                side: side.side,
                handshake,
            })
            .inc();
        let open = self.connections_open.get_or_create(&side).clone();
        open.inc();
        OpenTunnel(open)
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

//! The data plane: listeners that take redirected connections and carry
//! their bytes to an endpoint.

pub mod outbound;
mod socket;

pub use outbound::{OutboundContext, OutboundListener};

//! The data plane: listeners that take redirected connections and carry
//! their bytes to an endpoint.

pub mod capture;
pub mod copy;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod preamble;
pub mod socket;

pub use outbound::{OutboundContext, OutboundListener};

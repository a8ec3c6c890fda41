//! Choosing an endpoint for a new connection.

mod round_robin;

pub use round_robin::RoundRobin;

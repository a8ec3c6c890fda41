//! How a connection's bytes are carried once both ends are open: the copy
//! loop in both directions with its idle and lifetime limits, and the
//! preamble that names the target inside an mTLS stream. The TLS streams
//! themselves come from [`crate::tls`].

pub mod copy;
pub mod preamble;

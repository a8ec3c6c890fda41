//! What the agent knows of requests, apart from any one connection: which
//! may be sent twice and when ([`rules`]), and the connections to each
//! endpoint that requests share ([`pool`]), the request's hop of its
//! trace ([`trace`]). The proxy's request path
//! (`proxy/l7/`) puts them to work.

pub mod body;
mod peer_settings;
pub mod pool;
pub mod rules;
pub mod trace;

pub use body::UpBody;
pub use pool::{EndpointPool, Pools, Sender};
pub use rules::{FallbackTo, Pushback, RequestPolicy};

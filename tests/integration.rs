//! Every integration test, as root, in one binary: each file below is the
//! scenarios of one concern, `support` their helpers. One binary builds
//! and links once where a binary per file linked the agent's library and
//! the helpers a dozen times. Run one concern with its module name as the
//! filter: `cargo test --test integration mtls::`.

mod support;

mod config_errors;
mod dualstack;
mod enforcement;
mod fastpath;
mod grpc;
mod kube;
mod kubeapi_selftest;
mod l7;
mod l7_abuse;
mod l7_mesh;
mod mtls;
mod observability;
mod pods;
mod preflight;
mod redirect;
mod resilience;
mod tunnel_moves;
mod tunnels;
mod upgrade;

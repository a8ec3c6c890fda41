//! The preamble a peer agent sends first on an inbound connection: any
//! bytes give an address or an error, never a panic; an address read back
//! from what `write` wrote is the one written.

#![no_main]

use std::{
    future::Future,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    pin::pin,
    task::{Context, Poll, Waker},
};

use libfuzzer_sys::fuzz_target;
use sluice::carry::preamble;

fuzz_target!(|data: &[u8]| {
    if let Ok(target) = now(preamble::read(&mut &data[..])) {
        assert_eq!(
            round_trip(target),
            target,
            "a preamble that was read rewrites as itself"
        );
    }
    if let Some(target) = address(data) {
        assert_eq!(
            round_trip(target),
            target,
            "write then read gives the address back"
        );
    }
});

/// Polls once: reading from a slice and writing to a Vec never wait, so a
/// pending future here would be a bug of the target, not a slow input.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("in-memory I/O does not wait"),
    }
}

fn round_trip(target: SocketAddr) -> SocketAddr {
    let mut wire = Vec::new();
    now(preamble::write(&mut wire, target)).expect("writing to a Vec cannot fail");
    now(preamble::read(&mut wire.as_slice())).expect("what write wrote reads back")
}

/// An address made of the input's first bytes: a selector, then the IP,
/// port and (IPv6) scope id. The flow label is left 0: the preamble
/// carries `ip:port` only, by design.
fn address(data: &[u8]) -> Option<SocketAddr> {
    let (&kind, rest) = data.split_first()?;
    if kind % 2 == 0 {
        let (ip, rest) = rest.split_first_chunk::<4>()?;
        let (port, _) = rest.split_first_chunk::<2>()?;
        Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(*ip),
            u16::from_be_bytes(*port),
        )))
    } else {
        let (ip, rest) = rest.split_first_chunk::<16>()?;
        let (port, rest) = rest.split_first_chunk::<2>()?;
        let (scope, _) = rest.split_first_chunk::<4>()?;
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(*ip),
            u16::from_be_bytes(*port),
            0,
            u32::from_be_bytes(*scope),
        )))
    }
}

//! The preamble a peer agent sends first inside the TLS stream: which
//! local workload address and port the connection is for.
//!
//! Wire format, version 1: `b'S'`, version byte `1`, payload length as a
//! big-endian u16 (at most [`MAX_PAYLOAD`]), then the payload: the target
//! as UTF-8 `ip:port`. Anything else is refused.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: u8 = b'S';
const VERSION: u8 = 1;
/// The whole preamble stays under 1 KiB.
pub const MAX_PAYLOAD: usize = 1020;

/// Why a preamble was refused.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    #[error("not a Sluice preamble (magic {0:#04x})")]
    BadMagic(u8),
    #[error("preamble version {0} is not supported (this agent speaks 1)")]
    Version(u8),
    #[error("preamble of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    Oversized(usize),
    #[error("preamble target is not ip:port")]
    Malformed,
    #[error("connection closed inside the preamble: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the preamble for `target`.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, target: SocketAddr) -> std::io::Result<()> {
    let payload = target.to_string();
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&[MAGIC, VERSION]);
    buf.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    buf.extend_from_slice(payload.as_bytes());
    w.write_all(&buf).await
}

/// Reads a preamble. The caller bounds the time it may take.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<SocketAddr, PreambleError> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await?;
    if head[0] != MAGIC {
        return Err(PreambleError::BadMagic(head[0]));
    }
    if head[1] != VERSION {
        return Err(PreambleError::Version(head[1]));
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if len > MAX_PAYLOAD {
        return Err(PreambleError::Oversized(len));
    }
    let mut payload = [0u8; MAX_PAYLOAD];
    r.read_exact(&mut payload[..len]).await?;
    std::str::from_utf8(&payload[..len])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(PreambleError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_refusals() {
        let target: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let mut buf = Vec::new();
        write(&mut buf, target).await.unwrap();
        assert_eq!(read(&mut buf.as_slice()).await.unwrap(), target);

        let mut big = vec![b'S', 1];
        big.extend_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(
            read(&mut big.as_slice()).await,
            Err(PreambleError::Oversized(2000))
        ));
        assert!(matches!(
            read(&mut &b"GET / HTTP/1.1"[..]).await,
            Err(PreambleError::BadMagic(b'G'))
        ));
        assert!(matches!(
            read(&mut &b"S\x02\x00\x00"[..]).await,
            Err(PreambleError::Version(2))
        ));
        assert!(matches!(
            read(&mut &b"S\x01\x00\x03abc"[..]).await,
            Err(PreambleError::Malformed)
        ));
        assert!(matches!(
            read(&mut &b"S\x01\x00\x09127.0"[..]).await,
            Err(PreambleError::Io(_))
        ));
    }

    /// The first four bytes for a payload of `len` bytes.
    fn head(len: u16) -> Vec<u8> {
        let mut head = vec![MAGIC, VERSION];
        head.extend_from_slice(&len.to_be_bytes());
        head
    }

    /// A preamble with `payload` as its target.
    fn with_payload(payload: &[u8]) -> Vec<u8> {
        let mut wire = head(payload.len() as u16);
        wire.extend_from_slice(payload);
        wire
    }

    async fn read_from(wire: &[u8]) -> Result<SocketAddr, PreambleError> {
        read(&mut &wire[..]).await
    }

    #[tokio::test]
    async fn ipv6_targets_round_trip() {
        for target in [
            "[2001:db8::1]:443",
            "[::1]:9001",
            "[::ffff:10.0.0.1]:80",
            "[fe80::1%7]:8080",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let target: SocketAddr = target.parse().unwrap();
            let mut wire = Vec::new();
            write(&mut wire, target).await.unwrap();
            assert!(wire.len() <= 4 + MAX_PAYLOAD);
            assert_eq!(read_from(&wire).await.unwrap(), target, "{target}");
        }
    }

    #[tokio::test]
    async fn the_preamble_is_read_to_its_end_and_not_a_byte_further() {
        let target: SocketAddr = "[2001:db8::7]:5432".parse().unwrap();
        let mut wire = Vec::new();
        write(&mut wire, target).await.unwrap();
        wire.extend_from_slice(b"the application's first bytes");
        let mut rest = &wire[..];
        assert_eq!(read(&mut rest).await.unwrap(), target);
        assert_eq!(rest, b"the application's first bytes");
    }

    #[tokio::test]
    async fn a_stream_that_ends_early_is_refused_as_cut_short() {
        let whole = with_payload(b"10.1.2.3:80");
        // Every cut: inside the head, at its end, inside the payload.
        for cut in 0..whole.len() {
            match read_from(&whole[..cut]).await {
                Err(PreambleError::Io(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "cut at {cut}")
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(read_from(&whole).await.is_ok());
    }

    #[tokio::test]
    async fn another_protocol_or_version_is_refused_by_its_first_bytes() {
        // A TLS record, as from a client that spoke TLS twice.
        assert!(matches!(
            read_from(b"\x16\x03\x01\x02\x00").await,
            Err(PreambleError::BadMagic(0x16))
        ));
        for version in [0u8, 2, 0xff] {
            let mut wire = with_payload(b"10.1.2.3:80");
            wire[1] = version;
            match read_from(&wire).await {
                Err(PreambleError::Version(v)) => assert_eq!(v, version),
                other => panic!("version {version}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_target_that_is_not_an_ip_address_and_port_is_refused() {
        for payload in [
            &b""[..],
            b"localhost:80",
            b"/run/app.sock",
            b"unix:/run/app.sock",
            b"10.1.2.3",
            b"10.1.2.3:",
            b"10.1.2.3:65536",
            b"::1:80",
            b"[::1]",
            b"10.1.2.3:80\n",
            b" 10.1.2.3:80",
            b"\xff\xfe10.1.2.3:80",
        ] {
            assert!(
                matches!(
                    read_from(&with_payload(payload)).await,
                    Err(PreambleError::Malformed)
                ),
                "{:?}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[tokio::test]
    async fn a_length_over_the_limit_is_refused_before_the_payload_is_read() {
        // The limit itself is a length, even of a payload that is no target.
        let mut at_limit = head(MAX_PAYLOAD as u16);
        at_limit.extend(std::iter::repeat_n(b'1', MAX_PAYLOAD));
        assert!(matches!(
            read_from(&at_limit).await,
            Err(PreambleError::Malformed)
        ));
        // One more is refused from the head alone: no payload follows.
        for len in [MAX_PAYLOAD + 1, usize::from(u16::MAX)] {
            match read_from(&head(len as u16)).await {
                Err(PreambleError::Oversized(n)) => assert_eq!(n, len),
                other => panic!("length {len}: {other:?}"),
            }
        }
    }
}

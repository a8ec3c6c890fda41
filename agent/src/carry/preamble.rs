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
}

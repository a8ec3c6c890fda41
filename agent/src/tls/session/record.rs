//! TLS 1.3 records of the data phase (RFC 8446 section 5): what one
//! direction has received and what it has sealed but not yet written.
//!
//! No I/O here: the halves (`halves.rs`) move bytes between these buffers
//! and the socket. Both buffers are empty and unallocated while nothing is
//! in flight, so an idle session holds no record buffer.

use std::{
    ops::Range,
    sync::atomic::{AtomicBool, Ordering},
};

use rustls::{
    AlertDescription, ContentType, HandshakeType, client::ClientConnectionData,
    kernel::KernelConnection,
};

use super::{Role, SessionError, keys::TrafficKeys};

/// Record header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Largest plaintext of one record (2^14).
pub(super) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest record body a peer may send (2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest record, header included: what one read makes room for.
pub(super) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// The legacy record version every TLS 1.3 record carries.
const LEGACY_VERSION: [u8; 2] = [3, 3];
/// KeyUpdates accepted without application data in between (rustls allows
/// as many): a peer sending them in a loop is cut off.
const MAX_UPDATES_IN_A_ROW: u32 = 32;
/// Largest post-handshake message accepted (a NewSessionTicket is far smaller).
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;

/// The receiving direction.
pub(super) struct Rx {
    pub(super) keys: TrafficKeys,
    /// Received bytes: decrypted application data at `plain`, then bytes
    /// not yet decrypted from `raw` on (a partial record, or whole records
    /// the reader has not asked for yet).
    pub(super) buf: Vec<u8>,
    pub(super) plain: Range<usize>,
    pub(super) raw: usize,
    /// The peer's close_notify was received: reads give EOF.
    pub(super) closed: bool,
    /// A post-handshake message split across records, so far.
    pub(super) handshake: Vec<u8>,
    /// rustls's half of the session, kept by a client that did the
    /// handshake in this process until the server's first data: it stores
    /// the server's session tickets, so that the next connection resumes.
    pub(super) tickets: Option<Box<KernelConnection<ClientConnectionData>>>,
    pub(super) role: Role,
    updates_in_a_row: u32,
}

impl Rx {
    /// A receiving direction holding `plaintext` (decrypted, unread) and then
    /// `received` (not yet decrypted).
    pub(super) fn new(
        keys: TrafficKeys,
        role: Role,
        plaintext: &[u8],
        received: &[u8],
        handshake: Vec<u8>,
    ) -> Rx {
        let mut buf = Vec::new();
        if !plaintext.is_empty() || !received.is_empty() {
            buf.reserve_exact(plaintext.len() + received.len());
            buf.extend_from_slice(plaintext);
            buf.extend_from_slice(received);
        }
        Rx {
            keys,
            buf,
            plain: 0..plaintext.len(),
            raw: plaintext.len(),
            closed: false,
            handshake,
            tickets: None,
            role,
            updates_in_a_row: 0,
        }
    }

    /// Decrypted bytes not yet handed to the reader.
    pub(super) fn plaintext(&self) -> &[u8] {
        &self.buf[self.plain.clone()]
    }

    /// Received bytes not yet decrypted.
    pub(super) fn received(&self) -> &[u8] {
        &self.buf[self.raw..]
    }

    /// The reader took `n` bytes of [`Self::plaintext`].
    pub(super) fn consume(&mut self, n: usize) {
        self.plain.start += n;
        if self.plain.is_empty() {
            self.compact();
        }
    }

    /// Drops what was consumed, keeping the allocation for the next read.
    fn compact(&mut self) {
        if !self.plain.is_empty() {
            return;
        }
        if self.raw == self.buf.len() {
            self.buf.clear();
        } else if self.raw > 0 {
            self.buf.drain(..self.raw);
        }
        self.raw = 0;
        self.plain = 0..0;
    }

    /// Makes room to read at least one whole record.
    pub(super) fn make_room(&mut self) {
        self.compact();
        self.buf
            .reserve(MAX_RECORD.saturating_sub(self.buf.len() - self.raw));
    }

    /// A read found nothing: gives the buffer back while waiting, unless
    /// it holds part of a record.
    pub(super) fn release_if_empty(&mut self) {
        self.compact();
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
    }

    /// Bytes of buffer held (for tests of what an idle session costs).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity() + self.handshake.capacity()
    }

    /// Opens the next whole record, if one has arrived and the reader took
    /// all earlier plaintext. True if a record was consumed. A KeyUpdate
    /// asking for ours sets `answer`; a close_notify sets `closed`.
    pub(super) fn open_next(&mut self, answer: &AtomicBool) -> Result<bool, SessionError> {
        if !self.plain.is_empty() || self.closed {
            return Ok(false);
        }
        let start = self.raw;
        let Some(header) = self.buf.get(start..start + HEADER) else {
            return Ok(false);
        };
        let header: [u8; HEADER] = header.try_into().expect("five bytes");
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != u8::from(ContentType::ApplicationData) {
            return Err(SessionError::UnexpectedRecord(ContentType::from(header[0])));
        }
        if len > MAX_CIPHERTEXT {
            return Err(SessionError::RecordOverflow(len));
        }
        let end = start + HEADER + len;
        if self.buf.len() < end {
            return Ok(false);
        }
        let seq = self.keys.seq;
        let body = &mut self.buf[start + HEADER..end];
        let opened = self
            .keys
            .open(&header, body)
            .ok_or(SessionError::Undecryptable { seq })?;
        // The inner plaintext: content, its type, then zero padding.
        let inner = &self.buf[start + HEADER..start + HEADER + opened];
        let typ_at = inner
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(SessionError::Malformed("a record with no content type"))?;
        if typ_at > MAX_PLAINTEXT {
            return Err(SessionError::RecordOverflow(typ_at));
        }
        let content = start + HEADER..start + HEADER + typ_at;
        self.raw = end;
        match ContentType::from(inner[typ_at]) {
            ContentType::ApplicationData => {
                self.updates_in_a_row = 0;
                self.plain = content;
                // Servers send their tickets right after the handshake,
                // before any data: rustls's half has served its purpose.
                self.tickets = None;
            }
            ContentType::Alert => self.alert(content)?,
            ContentType::Handshake => self.handshake(content, answer)?,
            other => return Err(SessionError::UnexpectedRecord(other)),
        }
        self.compact();
        Ok(true)
    }

    fn alert(&mut self, content: Range<usize>) -> Result<(), SessionError> {
        let &[_level, description] = &self.buf[content] else {
            return Err(SessionError::Malformed("an alert that is not two bytes"));
        };
        match AlertDescription::from(description) {
            AlertDescription::CloseNotify => {
                // Nothing after it counts.
                self.closed = true;
                self.buf = Vec::new();
                self.raw = 0;
                self.plain = 0..0;
                Ok(())
            }
            // Announces a close_notify (RFC 8446 section 6.1).
            AlertDescription::UserCanceled => Ok(()),
            other => Err(SessionError::Alert(other)),
        }
    }

    fn handshake(
        &mut self,
        content: Range<usize>,
        answer: &AtomicBool,
    ) -> Result<(), SessionError> {
        if content.is_empty() {
            return Err(SessionError::Malformed("an empty handshake record"));
        }
        self.handshake.extend_from_slice(&self.buf[content]);
        let mut at = 0;
        while let Some(&[typ, a, b, c]) = self.handshake.get(at..at + 4) {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(SessionError::Malformed(
                    "a post-handshake message over 64 KiB",
                ));
            }
            let Some(body) = self.handshake.get(at + 4..at + 4 + len) else {
                break;
            };
            at += 4 + len;
            match HandshakeType::from(typ) {
                HandshakeType::KeyUpdate => {
                    let &[request] = body else {
                        return Err(SessionError::Malformed("a KeyUpdate that is not one byte"));
                    };
                    if at != self.handshake.len() {
                        // RFC 8446 section 5.1: no message may span a key change.
                        return Err(SessionError::Malformed(
                            "a KeyUpdate not at the end of its record",
                        ));
                    }
                    self.key_update(request, answer)?;
                }
                HandshakeType::NewSessionTicket if self.role == Role::Client => {
                    if let Some(kernel) = &mut self.tickets {
                        kernel
                            .handle_new_session_ticket(body)
                            .map_err(SessionError::Ticket)?;
                    }
                }
                other => return Err(SessionError::UnexpectedHandshake(other)),
            }
        }
        if at == self.handshake.len() {
            self.handshake = Vec::new();
        } else {
            self.handshake.drain(..at);
        }
        Ok(())
    }

    fn key_update(&mut self, request: u8, answer: &AtomicBool) -> Result<(), SessionError> {
        self.updates_in_a_row += 1;
        if self.updates_in_a_row > MAX_UPDATES_IN_A_ROW {
            return Err(SessionError::Malformed(
                "over 32 KeyUpdates without application data",
            ));
        }
        match request {
            0 => {}
            1 => answer.store(true, Ordering::Relaxed),
            _ => {
                return Err(SessionError::Malformed(
                    "a KeyUpdate request other than 0 or 1",
                ));
            }
        }
        self.keys = self.keys.next_generation();
        Ok(())
    }
}

/// The sending direction.
pub(super) struct Tx {
    pub(super) keys: TrafficKeys,
    /// Sealed records not yet written from `written` on; unallocated when
    /// everything went out.
    pub(super) out: Vec<u8>,
    pub(super) written: usize,
    /// Our close_notify is sealed: no more records.
    pub(super) closed: bool,
    /// Our keys are renewed before the record of this sequence number.
    pub(super) update_at: u64,
    /// A KeyUpdate asking for the peer's is due before the next record.
    pub(super) refresh: bool,
}

impl Tx {
    pub(super) fn new(keys: TrafficKeys) -> Tx {
        Tx {
            update_at: update_at(&keys),
            keys,
            out: Vec::new(),
            written: 0,
            closed: false,
            refresh: false,
        }
    }

    /// Sealed bytes still to write.
    pub(super) fn unwritten(&self) -> &[u8] {
        &self.out[self.written..]
    }

    /// `n` more bytes were written; frees the buffer once all were.
    pub(super) fn advance(&mut self, n: usize) {
        self.written += n;
        if self.written == self.out.len() {
            self.out = Vec::new();
            self.written = 0;
        }
    }

    /// Seals up to one record of `data`, after a KeyUpdate if one is due
    /// (`answer`: the peer asked for one); how many bytes it took.
    pub(super) fn push_data(&mut self, data: &[u8], answer: bool) -> usize {
        if answer || self.refresh || self.keys.seq >= self.update_at {
            self.push_key_update();
        }
        let n = data.len().min(MAX_PLAINTEXT);
        self.push(ContentType::ApplicationData, &data[..n]);
        n
    }

    /// [`Self::push_data`] for data in parts (an HTTP/2 frame's header
    /// and payload): one record of as much of them as fits.
    pub(super) fn push_data_vectored(
        &mut self,
        parts: &[std::io::IoSlice<'_>],
        answer: bool,
    ) -> usize {
        if answer || self.refresh || self.keys.seq >= self.update_at {
            self.push_key_update();
        }
        let n = parts
            .iter()
            .map(|p| p.len())
            .sum::<usize>()
            .min(MAX_PLAINTEXT);
        self.push_parts(ContentType::ApplicationData, parts, n);
        n
    }

    /// Seals a close_notify alert; nothing is sent after it.
    pub(super) fn push_close_notify(&mut self) {
        self.push(
            ContentType::Alert,
            &[1, u8::from(AlertDescription::CloseNotify)],
        );
        self.closed = true;
    }

    /// Seals a KeyUpdate under the current keys and moves to the next.
    fn push_key_update(&mut self) {
        let request = u8::from(std::mem::take(&mut self.refresh));
        self.push(
            ContentType::Handshake,
            &[u8::from(HandshakeType::KeyUpdate), 0, 0, 1, request],
        );
        self.keys = self.keys.next_generation();
        self.update_at = update_at(&self.keys);
    }

    fn push(&mut self, typ: ContentType, content: &[u8]) {
        self.push_parts(typ, &[std::io::IoSlice::new(content)], content.len());
    }

    /// Seals the first `content_len` bytes of `parts` as one record.
    fn push_parts(&mut self, typ: ContentType, parts: &[std::io::IoSlice<'_>], content_len: usize) {
        let body = content_len + 1 + self.keys.tag_len();
        let len = (body as u16).to_be_bytes();
        let header = [
            u8::from(ContentType::ApplicationData),
            LEGACY_VERSION[0],
            LEGACY_VERSION[1],
            len[0],
            len[1],
        ];
        let at = self.out.len();
        self.out.reserve_exact(HEADER + body);
        self.out.extend_from_slice(&header);
        let mut left = content_len;
        for part in parts {
            let n = part.len().min(left);
            self.out.extend_from_slice(&part[..n]);
            left -= n;
        }
        self.out.push(u8::from(typ));
        self.out.resize(at + HEADER + body, 0);
        self.keys.seal(&header, &mut self.out[at + HEADER..]);
    }
}

/// The sequence number at which `keys` are renewed: the last one the
/// suite's confidentiality limit allows goes to the KeyUpdate.
fn update_at(keys: &TrafficKeys) -> u64 {
    keys.suite.confidentiality_limit().saturating_sub(1).max(1)
}

//! The keys of one direction of a TLS 1.3 session: the traffic secret,
//! the AEAD key and IV derived from it (RFC 8446 section 7.3), the record
//! sequence number, and the next generation a KeyUpdate moves to (section
//! 7.2).
//!
//! HKDF is the negotiated suite's, from rustls's provider
//! (`Tls13CipherSuite::hkdf_provider`); the AEAD is aws-lc's. rustls's own
//! `MessageEncrypter` cannot serve here: outside rustls an `AeadKey` can only
//! be 32 bytes long (AES-128 needs 16), and its GCM sealer takes the first
//! sequence number it sees for 0, which a resumed direction's is not.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, SupportedCipherSuite, Tls13CipherSuite,
    crypto::tls13::OkmBlock,
};

/// A TLS 1.3 suite this record layer can carry, with its aws-lc AEAD.
#[derive(Clone, Copy)]
pub(super) struct Suite {
    pub(super) tls: &'static Tls13CipherSuite,
    aead: &'static aead::Algorithm,
}

impl Suite {
    /// The suite rustls negotiated, if it is one of the three TLS 1.3 suites.
    pub(super) fn of(tls: &'static Tls13CipherSuite) -> Option<Suite> {
        let aead = match tls.common.suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => &aead::AES_128_GCM,
            CipherSuite::TLS13_AES_256_GCM_SHA384 => &aead::AES_256_GCM,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => &aead::CHACHA20_POLY1305,
            _ => return None,
        };
        Some(Suite { tls, aead })
    }

    /// The suite of IANA number `id`, as the aws-lc-rs provider defines it
    /// (the provider every agent configuration uses).
    pub(super) fn by_id(id: u16) -> Option<Suite> {
        rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .find_map(|s| match s {
                SupportedCipherSuite::Tls13(t) if u16::from(t.common.suite) == id => Suite::of(t),
                _ => None,
            })
    }

    /// The suite's IANA number.
    pub(super) fn id(&self) -> u16 {
        u16::from(self.tls.common.suite)
    }

    /// Records one key may protect (2^24 for AES-GCM).
    pub(super) fn confidentiality_limit(&self) -> u64 {
        self.tls.common.confidentiality_limit
    }

    /// Length of a traffic secret: the suite's hash length.
    pub(super) fn secret_len(&self) -> usize {
        self.tls.common.hash_provider.output_len()
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()), RFC 8446 section 7.1.
    fn expand_label(&self, secret: &OkmBlock, label: &[u8], out: &mut [u8]) {
        const PREFIX: &[u8] = b"tls13 ";
        let expander = self.tls.hkdf_provider.expander_for_okm(secret);
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(PREFIX.len() + label.len()) as u8];
        let context_len = [0u8];
        expander
            .expand_slice(&[&length, &label_len, PREFIX, label, &context_len], out)
            .expect("key, IV and secret lengths are far below HKDF's 255 blocks");
    }

    /// The AEAD key and IV of `secret`: "key" and "iv" labels.
    fn key_and_iv(&self, secret: &OkmBlock) -> ([u8; 32], [u8; NONCE_LEN]) {
        let mut key = [0u8; 32];
        let mut iv = [0u8; NONCE_LEN];
        self.expand_label(secret, b"key", &mut key[..self.aead.key_len()]);
        self.expand_label(secret, b"iv", &mut iv);
        (key, iv)
    }

    /// The secret after `secret` ("traffic upd"), RFC 8446 section 7.2.
    pub(super) fn next_secret(&self, secret: &OkmBlock) -> OkmBlock {
        let mut next = [0u8; OkmBlock::MAX_LEN];
        let len = self.secret_len();
        self.expand_label(secret, b"traffic upd", &mut next[..len]);
        let block = OkmBlock::new(&next[..len]);
        wipe(&mut next);
        block
    }

    /// Whether `secret` yields the key and IV rustls extracted: the check
    /// that our derivation is rustls's, made on every session.
    pub(super) fn yields(&self, secret: &OkmBlock, extracted: &ConnectionTrafficSecrets) -> bool {
        let (theirs_key, theirs_iv) = match extracted {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return false,
        };
        let (mut key, iv) = self.key_and_iv(secret);
        let same = &key[..self.aead.key_len()] == theirs_key && iv.as_slice() == theirs_iv;
        wipe(&mut key);
        same
    }
}

/// Overwrites key material before it goes out of scope.
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// One direction's current keys and the sequence number of its next record.
pub(super) struct TrafficKeys {
    pub(super) suite: Suite,
    secret: OkmBlock,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// Sequence number of the next record under these keys.
    pub(super) seq: u64,
}

impl TrafficKeys {
    /// Keys of traffic secret `secret`, the next record being number `seq`.
    pub(super) fn new(suite: Suite, secret: OkmBlock, seq: u64) -> TrafficKeys {
        let (mut key, iv) = suite.key_and_iv(&secret);
        let unbound = UnboundKey::new(suite.aead, &key[..suite.aead.key_len()])
            .expect("the key is derived at the algorithm's own length");
        wipe(&mut key);
        TrafficKeys {
            suite,
            secret,
            key: LessSafeKey::new(unbound),
            iv,
            seq,
        }
    }

    /// The keys after a KeyUpdate: the next secret, sequence number 0.
    pub(super) fn next_generation(&self) -> TrafficKeys {
        TrafficKeys::new(self.suite, self.suite.next_secret(&self.secret), 0)
    }

    /// The current traffic secret.
    pub(super) fn secret(&self) -> &OkmBlock {
        &self.secret
    }

    /// The AEAD's tag length (16 for all three suites).
    pub(super) fn tag_len(&self) -> usize {
        self.suite.aead.tag_len()
    }

    /// The per-record nonce: the IV xor the sequence number (section 5.3).
    fn nonce(&self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts the inner plaintext `in_out[..len - tag]` in place, the tag
    /// going to its last `tag_len()` bytes; `header` is the record header
    /// (the additional data). Takes the next sequence number.
    pub(super) fn seal(&mut self, header: &[u8; 5], in_out: &mut [u8]) {
        let split = in_out.len() - self.tag_len();
        let (text, tag_out) = in_out.split_at_mut(split);
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(), Aad::from(header), text)
            .expect("a record is far below the AEAD's length limit");
        tag_out.copy_from_slice(tag.as_ref());
        self.seq += 1;
    }

    /// Decrypts a record body (ciphertext and tag) in place; the inner
    /// plaintext's length, or None when it does not authenticate. Takes the
    /// next sequence number only on success.
    pub(super) fn open(&mut self, header: &[u8; 5], in_out: &mut [u8]) -> Option<usize> {
        let nonce = self.nonce();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), in_out)
            .ok()?
            .len();
        self.seq += 1;
        Some(plain)
    }
}

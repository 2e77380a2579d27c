//! The replication wire format: a fixed 48-byte header followed by a payload.
//!
//! ```text
//! 0  magic u32 "BRPL"      4  version u8   5  kind u8   6  flags u16
//! 8  volume u32            12 request u64  20 offset u64
//! 28 op_len u32            32 payload_len u32
//! 36 status u32            40 payload_crc u32 (crc32fast of the payload)
//! 44 header_crc u32 (crc32fast of bytes 0..44)
//! ```
//! All integers little-endian. A frame that fails any check is refused and
//! the connection is dropped: nothing from it is ever written.

use bytes::Bytes;

/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 48;
/// "BRPL".
pub const FRAME_MAGIC: u32 = 0x4c50_5242;
/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest data payload (one I/O).
pub const DATA_PAYLOAD_MAX_BYTES: u32 = 1 << 20;
/// Largest control payload (JSON messages).
pub const CONTROL_PAYLOAD_MAX_BYTES: u32 = 64 * 1024;

/// Frame flag: write with FUA (durable before the ack).
pub const FLAG_FUA: u16 = 1;
/// Frame flag: this write is resync traffic.
pub const FLAG_RESYNC: u16 = 2;
/// Frame flag: this write is not on the sender's disk yet: the sender is
/// primary on a copy the receiver is resyncing, and writes its own copy only
/// after the receiver has applied it (in order with the resync).
pub const FLAG_FORWARD: u16 = 4;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Node hello (JSON payload), first frame on a connection.
    Hello,
    /// Per-volume state announcement (JSON payload).
    VolumeState,
    /// Replicated write: payload is the data.
    Write,
    /// Reply to Write/Flush/Zeroes: `status` is 0 or an errno.
    Ack,
    /// Flush request.
    Flush,
    /// Write zeroes over `op_len` bytes at `offset`.
    Zeroes,
    /// Read `op_len` bytes at `offset` (diskless primary).
    ReadRequest,
    /// Reply to ReadRequest: payload is the data, or `status` an errno.
    ReadReply,
    /// Hash `op_len` bytes at `offset` (verify, checksum resync).
    HashRequest,
    /// Reply to HashRequest: payload is the SHA-256 digest.
    HashReply,
    /// Lease renewal request (rule 7): the receiver grants the sender a
    /// primary lease counted from the sender's send time.
    LeasePing,
    /// Reply to LeasePing.
    LeasePong,
}

/// Bytes of a digest in a HashReply.
pub const DIGEST_BYTES: u32 = 32;

impl Kind {
    fn to_u8(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::VolumeState => 2,
            Kind::Write => 10,
            Kind::Ack => 11,
            Kind::Flush => 12,
            Kind::Zeroes => 13,
            Kind::ReadRequest => 14,
            Kind::ReadReply => 15,
            Kind::HashRequest => 16,
            Kind::HashReply => 17,
            Kind::LeasePing => 20,
            Kind::LeasePong => 21,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::VolumeState,
            10 => Kind::Write,
            11 => Kind::Ack,
            12 => Kind::Flush,
            13 => Kind::Zeroes,
            14 => Kind::ReadRequest,
            15 => Kind::ReadReply,
            16 => Kind::HashRequest,
            17 => Kind::HashReply,
            20 => Kind::LeasePing,
            21 => Kind::LeasePong,
            _ => return None,
        })
    }

    /// Largest payload this kind may carry.
    pub fn payload_max_bytes(self) -> u32 {
        match self {
            Kind::Hello | Kind::VolumeState => CONTROL_PAYLOAD_MAX_BYTES,
            Kind::Write | Kind::ReadReply => DATA_PAYLOAD_MAX_BYTES,
            Kind::HashReply => DIGEST_BYTES,
            Kind::Ack
            | Kind::Flush
            | Kind::Zeroes
            | Kind::ReadRequest
            | Kind::HashRequest
            | Kind::LeasePing
            | Kind::LeasePong => 0,
        }
    }
}

impl Kind {
    /// Longest I/O (`op_len`) this kind may ask for: a read's reply is one
    /// frame, and a digest covers at most what one read brings (resync and
    /// verify chunks are at most 1 MiB). Zeroes carry no data and are not
    /// bounded here.
    pub fn op_len_max_bytes(self) -> u32 {
        match self {
            Kind::ReadRequest | Kind::HashRequest => DATA_PAYLOAD_MAX_BYTES,
            _ => u32::MAX,
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// FLAG_* bits.
    pub flags: u16,
    /// Volume index, as announced by the sender's VolumeState.
    pub volume: u32,
    /// Request id chosen by the requester; echoed in replies.
    pub request: u64,
    /// Byte offset of the I/O.
    pub offset: u64,
    /// Length of the I/O (Zeroes, ReadRequest).
    pub op_len: u32,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
    /// 0 or an errno (replies).
    pub status: u32,
    /// crc32fast of the payload.
    pub payload_crc: u32,
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Not a blkrep frame.
    #[error("bad frame magic {0:#x}")]
    BadMagic(u32),
    /// Another protocol version.
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    BadVersion(u8),
    /// Header checksum mismatch.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Payload larger than allowed for its kind.
    #[error("{kind:?} frame announces {len} payload bytes, at most {max} allowed")]
    Oversized {
        /// Frame kind.
        kind: Kind,
        /// Announced length.
        len: u32,
        /// Allowed maximum.
        max: u32,
    },
    /// An I/O longer than one frame may answer.
    #[error("{kind:?} frame asks for {len} bytes, at most {max} allowed")]
    OpTooLong {
        /// Frame kind.
        kind: Kind,
        /// Asked length.
        len: u32,
        /// Allowed maximum.
        max: u32,
    },
    /// Payload checksum mismatch.
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    /// Input ended inside a frame.
    #[error("truncated frame")]
    Truncated,
}

impl Header {
    /// A header for `kind` with everything else zero.
    pub fn new(kind: Kind) -> Self {
        Header {
            kind,
            flags: 0,
            volume: 0,
            request: 0,
            offset: 0,
            op_len: 0,
            payload_len: 0,
            status: 0,
            payload_crc: 0,
        }
    }

    /// Encodes the header for `payload` (length and CRC are filled in).
    pub fn encode(mut self, payload: &[u8]) -> [u8; HEADER_BYTES] {
        self.payload_len = payload.len() as u32;
        self.payload_crc = if payload.is_empty() {
            0
        } else {
            crc32fast::hash(payload)
        };
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4] = PROTOCOL_VERSION;
        b[5] = self.kind.to_u8();
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.volume.to_le_bytes());
        b[12..20].copy_from_slice(&self.request.to_le_bytes());
        b[20..28].copy_from_slice(&self.offset.to_le_bytes());
        b[28..32].copy_from_slice(&self.op_len.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.status.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < HEADER_BYTES {
            return Err(WireError::Truncated);
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        if crc32fast::hash(&b[..44]) != u32_at(44) {
            return Err(WireError::HeaderChecksum);
        }
        let kind = Kind::from_u8(b[5]).ok_or(WireError::UnknownKind(b[5]))?;
        let h = Header {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            volume: u32_at(8),
            request: u64_at(12),
            offset: u64_at(20),
            op_len: u32_at(28),
            payload_len: u32_at(32),
            status: u32_at(36),
            payload_crc: u32_at(40),
        };
        if h.op_len > kind.op_len_max_bytes() {
            return Err(WireError::OpTooLong {
                kind,
                len: h.op_len,
                max: kind.op_len_max_bytes(),
            });
        }
        if h.payload_len > kind.payload_max_bytes() {
            return Err(WireError::Oversized {
                kind,
                len: h.payload_len,
                max: kind.payload_max_bytes(),
            });
        }
        Ok(h)
    }

    /// Checks a received payload against the header's CRC.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() != self.payload_len as usize {
            return Err(WireError::Truncated);
        }
        let crc = if payload.is_empty() {
            0
        } else {
            crc32fast::hash(payload)
        };
        if crc != self.payload_crc {
            return Err(WireError::PayloadChecksum);
        }
        Ok(())
    }
}

/// A whole frame ready to send: header bytes plus payload.
pub struct OutFrame {
    /// Encoded header.
    pub header: Bytes,
    /// Payload (may be empty).
    pub payload: Bytes,
}

impl OutFrame {
    /// Builds a frame from a header and payload.
    pub fn new(header: Header, payload: Bytes) -> Self {
        let h = header.encode(&payload);
        OutFrame {
            header: Bytes::copy_from_slice(&h),
            payload,
        }
    }
}

/// Decodes one complete frame from a byte slice (used by tests and fuzzing;
/// the link reads header and payload separately from the stream).
pub fn decode_frame(b: &[u8]) -> Result<(Header, &[u8]), WireError> {
    let h = Header::decode(b)?;
    let end = HEADER_BYTES + h.payload_len as usize;
    let payload = b.get(HEADER_BYTES..end).ok_or(WireError::Truncated)?;
    h.verify_payload(payload)?;
    Ok((h, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_frame(payload: &[u8]) -> Vec<u8> {
        let mut h = Header::new(Kind::Write);
        h.volume = 3;
        h.request = 42;
        h.offset = 8192;
        h.flags = FLAG_FUA;
        let mut v = h.encode(payload).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip() {
        let payload = vec![7u8; 4096];
        let f = write_frame(&payload);
        let (h, p) = decode_frame(&f).unwrap();
        assert_eq!(
            (h.kind, h.volume, h.request, h.offset, h.flags),
            (Kind::Write, 3, 42, 8192, 1)
        );
        assert_eq!(p, &payload[..]);
    }

    #[test]
    fn corrupted_payload_is_refused() {
        let mut f = write_frame(&[1u8; 4096]);
        f[HEADER_BYTES + 100] ^= 1;
        assert_eq!(decode_frame(&f).unwrap_err(), WireError::PayloadChecksum);
    }

    #[test]
    fn corrupted_header_is_refused() {
        for at in 0..HEADER_BYTES {
            let mut f = write_frame(&[1u8; 16]);
            f[at] ^= 0x40;
            assert!(decode_frame(&f).is_err(), "flip at {at} accepted");
        }
    }

    #[test]
    fn truncated_frames_are_refused() {
        let f = write_frame(&[9u8; 4096]);
        for cut in [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 4095] {
            assert_eq!(decode_frame(&f[..cut]).unwrap_err(), WireError::Truncated);
        }
    }

    /// Issue 14, hole 5: a peer cannot make this node allocate more than
    /// one frame's worth for a read or a digest.
    #[test]
    fn reads_and_digests_longer_than_a_frame_are_refused() {
        for kind in [Kind::ReadRequest, Kind::HashRequest] {
            let mut h = Header::new(kind);
            h.op_len = DATA_PAYLOAD_MAX_BYTES;
            assert_eq!(Header::decode(&h.encode(&[])), Ok(h));
            h.op_len = DATA_PAYLOAD_MAX_BYTES + 4096;
            assert!(matches!(
                Header::decode(&h.encode(&[])),
                Err(WireError::OpTooLong { .. })
            ));
        }
        let mut z = Header::new(Kind::Zeroes);
        z.op_len = !4095;
        assert!(Header::decode(&z.encode(&[])).is_ok(), "zeroes stay long");
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_payload() {
        let mut h = Header::new(Kind::Write);
        h.payload_len = DATA_PAYLOAD_MAX_BYTES + 1;
        // Encode with a fake payload length by patching and re-checksumming.
        let mut b = h.encode(&[]);
        b[32..36].copy_from_slice(&(DATA_PAYLOAD_MAX_BYTES + 1).to_le_bytes());
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(WireError::Oversized { .. })
        ));
        let mut a = Header::new(Kind::Ack).encode(&[]);
        a[32] = 1;
        let crc = crc32fast::hash(&a[..44]);
        a[44..48].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Header::decode(&a),
            Err(WireError::Oversized { .. })
        ));
    }

    #[test]
    fn wrong_version_and_kind_are_refused() {
        let mut b = Header::new(Kind::Ack).encode(&[]);
        b[4] = 9;
        assert_eq!(Header::decode(&b).unwrap_err(), WireError::BadVersion(9));
        let mut b = Header::new(Kind::Ack).encode(&[]);
        b[5] = 99;
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Header::decode(&b).unwrap_err(), WireError::UnknownKind(99));
    }
}

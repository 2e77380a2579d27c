//! Messages between a data node and the witness, and their framing: one
//! request and one response per QUIC stream, each a 4-byte little-endian
//! length, a JSON body and a CRC32 of the body. Frames are bounded; anything
//! malformed is refused with an error and changes nothing.

use crate::quorum::{Record, RecordView};

/// Largest frame body accepted.
pub const FRAME_BODY_MAX_BYTES: usize = 256 * 1024;

/// Most claims one heartbeat carries. A node with more volumes sends
/// several heartbeats at once; one heartbeat and its answer, with every
/// name at its longest, stay well inside [`FRAME_BODY_MAX_BYTES`] (a test
/// checks the worst case). The witness refuses a heartbeat with more.
pub const HEARTBEAT_CLAIMS_MAX: usize = 256;
/// ALPN of the witness protocol.
pub const ALPN: &[u8] = b"blkrep-witness/1";

/// Framing and decoding problems.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length field exceeds `FRAME_BODY_MAX_BYTES`.
    #[error("frame of {0} bytes exceeds the limit of {FRAME_BODY_MAX_BYTES}")]
    TooLarge(usize),
    /// The frame is shorter than its header says.
    #[error("truncated frame")]
    Truncated,
    /// The checksum does not match.
    #[error("frame checksum mismatch")]
    Checksum,
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// What a node says about one of its volumes in every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// Volume name.
    pub volume: String,
    /// The other node of the volume.
    pub peer: String,
    /// The last record this node saw (or, never having seen one, what it
    /// knows: itself and, when connected in sync, its peer as up to date).
    pub view: RecordView,
    /// The node is primary right now.
    pub primary_now: bool,
}

/// The heartbeats that carry `claims`: at most [`HEARTBEAT_CLAIMS_MAX`]
/// each, and one empty heartbeat when there are none (it keeps the session
/// and learns the lease length).
pub fn heartbeat_batches(claims: &[Claim]) -> Vec<Vec<Claim>> {
    if claims.is_empty() {
        return vec![Vec::new()];
    }
    claims
        .chunks(HEARTBEAT_CLAIMS_MAX)
        .map(<[Claim]>::to_vec)
        .collect()
}

/// A change a node asks for: a quorum type (the engine asks for them),
/// carried by this protocol.
pub use crate::quorum::WitnessOp;

/// A request to the witness.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WitnessRequest {
    /// Renew this node's leases and learn the records of its volumes.
    Heartbeat {
        /// One per attached volume.
        claims: Vec<Claim>,
    },
    /// Change one record.
    Change {
        /// Volume name.
        volume: String,
        /// The other node of the volume.
        peer: String,
        /// The epoch the requester last saw.
        expected_epoch: u64,
        /// The change.
        op: WitnessOp,
    },
}

/// The witness's answer about one volume in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeAnswer {
    /// Volume name.
    pub volume: String,
    /// The record (None while the witness is still learning it).
    pub record: Option<Record>,
    /// The requester holds the primary lease for this volume.
    pub lease: bool,
    /// Why the witness refused this claim (it changed nothing for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// Why a change was refused.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The witness has no record yet (re-initialised: it learns the record
    /// once both nodes are connected to it and agree).
    #[error(
        "the witness has no record of this volume yet; it learns it when both nodes are connected to it and agree"
    )]
    Unknown,
    /// The requester is not listed as up to date.
    #[error("this node is outdated: the witness does not list it as up to date")]
    Outdated,
    /// The requester is not the primary.
    #[error("this node is not the primary at the witness")]
    NotPrimary,
    /// The record was forced (see `Record::forced`) and the promotion is not.
    #[error(
        "the witness record was forced: an operator promoted a copy not known to be complete; until both copies are in sync again, a promotion needs --force"
    )]
    Forced,
    /// The requester is not one of the volume's nodes (or names itself).
    #[error("this node may not change that record")]
    NotMember,
    /// The volume name breaks the rules of node configs (ASCII letters,
    /// digits, `-`, `_`, `.`, not starting with `.`, bounded length).
    #[error("invalid volume name {0:?}")]
    InvalidVolume(String),
    /// The peer named is not one of the data nodes this witness serves.
    #[error("{0:?} is not one of the nodes this witness serves (its `nodes` setting)")]
    UnknownPeer(String),
    /// An epoch beyond [`EPOCH_MAX`](crate::quorum::record::EPOCH_MAX): no
    /// witness ever counted that far.
    #[error("epoch {0} is beyond any the witness hands out")]
    EpochOutOfRange(u64),
    /// The node pair has as many records as the witness holds per pair.
    #[error("the witness holds at most {0} volumes per node pair; this one would exceed it")]
    TooManyVolumes(usize),
}

/// The outcome of a change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChangeOutcome {
    /// Done (or already so): the record now.
    Done(Record),
    /// The epoch moved on: the record now; decide again.
    Conflict(Record),
    /// Not allowed.
    Refused(Refusal),
    /// Another node may still hold the primary lease: ask again later.
    Wait {
        /// How long at most.
        wait_ms: u64,
        /// The node holding it.
        holder: String,
    },
}

/// A response from the witness.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WitnessResponse {
    /// Answer to a heartbeat.
    Heartbeat {
        /// Lease length the holder may count from its send time.
        lease_ms: u64,
        /// One per claim.
        volumes: Vec<VolumeAnswer>,
    },
    /// Answer to a change.
    Change(ChangeOutcome),
    /// The request was malformed.
    Error(String),
}

/// Encodes a message as one frame.
pub fn encode<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > FRAME_BODY_MAX_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    Ok(out)
}

/// Body length announced by a frame's first 4 bytes, checked against the limit.
pub fn body_len(head: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(head) as usize;
    if len > FRAME_BODY_MAX_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a whole frame.
pub fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    let head: [u8; 4] = frame
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let len = body_len(head)?;
    if frame.len() != 4 + len + 4 {
        return Err(FrameError::Truncated);
    }
    let body = &frame[4..4 + len];
    let crc = u32::from_le_bytes([
        frame[4 + len],
        frame[5 + len],
        frame[6 + len],
        frame[7 + len],
    ]);
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Checksum);
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14, hole 11: a node with 3000 volumes (every name at its
    /// longest) renews every lease. Its claims go in heartbeats of at most
    /// HEARTBEAT_CLAIMS_MAX, and each request and each answer of the real
    /// arbiter fits in a frame; in one heartbeat they would not.
    #[test]
    fn three_thousand_volumes_renew_every_lease_in_batches_that_fit() {
        use crate::quorum::{Holder, LeaseSettings, RecordView};
        let (a, b) = ("a".repeat(63), "b".repeat(63));
        assert!(crate::config::valid_node_name(&a));
        let volumes: Vec<String> = (0..3000).map(|i| format!("{i:0>64}")).collect();
        assert!(crate::config::valid_volume_name(&volumes[0]));
        let claims = |peer: &str, primary: Holder| -> Vec<Claim> {
            volumes
                .iter()
                .map(|v| Claim {
                    volume: v.clone(),
                    peer: peer.to_string(),
                    view: RecordView {
                        epoch: crate::quorum::record::EPOCH_MAX,
                        primary,
                        me_up_to_date: true,
                        peer_up_to_date: true,
                        forced: false,
                    },
                    primary_now: primary == Holder::Me,
                })
                .collect()
        };
        let (from_a, from_b) = (claims(&b, Holder::Me), claims(&a, Holder::Peer));
        let everything = WitnessRequest::Heartbeat {
            claims: from_a.clone(),
        };
        assert!(
            matches!(encode(&everything), Err(FrameError::TooLarge(_))),
            "one heartbeat for all of them would not fit"
        );
        let settings = LeaseSettings::default();
        let mut w = crate::witness::Arbiter::new(
            settings,
            &[a.clone(), b.clone()],
            1000,
            Default::default(),
        );
        let mut round = |node: &str, claims: &[Claim], now_ms: u64| -> Vec<VolumeAnswer> {
            let mut answers = Vec::new();
            for batch in heartbeat_batches(claims) {
                let req = WitnessRequest::Heartbeat { claims: batch };
                let frame = encode(&req).expect("a batch fits in a frame");
                let WitnessRequest::Heartbeat { claims } = decode(&frame).expect("decodes") else {
                    panic!("not a heartbeat");
                };
                let (volumes, _) = w.heartbeat(node, now_ms, &claims);
                let resp = WitnessResponse::Heartbeat {
                    lease_ms: settings.lease_ms,
                    volumes,
                };
                let frame = encode(&resp).expect("its answer fits in a frame");
                let WitnessResponse::Heartbeat { volumes, .. } = decode(&frame).expect("decodes")
                else {
                    panic!("not a heartbeat answer");
                };
                answers.extend(volumes);
            }
            answers
        };
        round(&a, &from_a, 1000);
        round(&b, &from_b, 1100);
        let answers = round(&a, &from_a, 1200);
        assert_eq!(answers.len(), volumes.len());
        for (v, answer) in volumes.iter().zip(&answers) {
            assert_eq!(&answer.volume, v);
            assert!(answer.lease, "{v}: no lease");
            assert_eq!(
                answer.record.as_ref().and_then(|r| r.primary.as_deref()),
                Some(a.as_str())
            );
        }
        assert_eq!(
            heartbeat_batches(&[]).len(),
            1,
            "an empty heartbeat still goes"
        );
    }

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        let req = WitnessRequest::Change {
            volume: "v".into(),
            peer: "b".into(),
            expected_epoch: 3,
            op: WitnessOp::Promote {
                force: false,
                incomplete: false,
            },
        };
        let f = encode(&req).unwrap();
        assert_eq!(decode::<WitnessRequest>(&f).unwrap(), req);
        let mut bad = f.clone();
        bad[6] ^= 1;
        assert!(matches!(
            decode::<WitnessRequest>(&bad),
            Err(FrameError::Checksum)
        ));
        assert!(matches!(
            decode::<WitnessRequest>(&f[..f.len() - 1]),
            Err(FrameError::Truncated)
        ));
        let mut huge = f.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode::<WitnessRequest>(&huge),
            Err(FrameError::TooLarge(_))
        ));
        let junk = encode(&"not a request").unwrap();
        assert!(matches!(
            decode::<WitnessRequest>(&junk),
            Err(FrameError::Malformed(_))
        ));
    }
}

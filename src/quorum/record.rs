//! The witness record of one volume, `{epoch, primary, up_to_date}`, and the
//! compact form a data node keeps of it (its superblock stores the last
//! record it saw, so that a re-initialised witness can learn it back).

use std::collections::BTreeSet;

/// Highest epoch taken from outside the witness (a claim, an expected
/// epoch, a stored record): far beyond any real number of changes, and
/// low enough that the witness's increments never overflow (an epoch that
/// wrapped would go backwards).
pub const EPOCH_MAX: u64 = 1 << 62;

/// The record the witness keeps, durably, per volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Incremented by every change (each change is a compare-and-set on it).
    pub epoch: u64,
    /// The node allowed to be primary, if any.
    pub primary: Option<String>,
    /// Nodes holding every completed write.
    pub up_to_date: BTreeSet<String>,
    /// The primary was forced against this record (it was not listed up to
    /// date): `up_to_date` names it because an operator insisted, which is
    /// no proof that it holds every acknowledged write, nor that the node
    /// it replaced lacks any. While set, the nodes follow their generations
    /// alone (diverged histories stay a split brain until `resolve`).
    /// Cleared when both nodes are listed again.
    #[serde(default)]
    pub forced: bool,
}

/// Who a record names, relative to one data node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Holder {
    /// Nobody.
    #[default]
    Nobody,
    /// This node.
    Me,
    /// The other node of the volume.
    Peer,
}

/// A record as seen from one of its two data nodes. Epoch 0 means "never
/// seen a record".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordView {
    /// The record's epoch.
    pub epoch: u64,
    /// Who may be primary.
    pub primary: Holder,
    /// This node is listed as up to date.
    pub me_up_to_date: bool,
    /// The peer is listed as up to date.
    pub peer_up_to_date: bool,
    /// The record's `forced` flag.
    #[serde(default)]
    pub forced: bool,
}

impl RecordView {
    /// The view node `me` (whose peer is `peer`) has of `r`.
    pub fn of(r: &Record, me: &str, peer: &str) -> Self {
        RecordView {
            epoch: r.epoch,
            primary: match r.primary.as_deref() {
                Some(p) if p == me => Holder::Me,
                Some(p) if p == peer => Holder::Peer,
                _ => Holder::Nobody,
            },
            me_up_to_date: r.up_to_date.contains(me),
            peer_up_to_date: r.up_to_date.contains(peer),
            forced: r.forced,
        }
    }

    /// The full record this view stands for.
    pub fn to_record(&self, me: &str, peer: &str) -> Record {
        let mut up_to_date = BTreeSet::new();
        if self.me_up_to_date {
            up_to_date.insert(me.to_string());
        }
        if self.peer_up_to_date {
            up_to_date.insert(peer.to_string());
        }
        Record {
            epoch: self.epoch,
            primary: match self.primary {
                Holder::Nobody => None,
                Holder::Me => Some(me.to_string()),
                Holder::Peer => Some(peer.to_string()),
            },
            up_to_date,
            forced: self.forced,
        }
    }

    /// The same record as the peer sees it.
    pub fn swapped(&self) -> Self {
        RecordView {
            epoch: self.epoch,
            primary: match self.primary {
                Holder::Me => Holder::Peer,
                Holder::Peer => Holder::Me,
                Holder::Nobody => Holder::Nobody,
            },
            me_up_to_date: self.peer_up_to_date,
            peer_up_to_date: self.me_up_to_date,
            forced: self.forced,
        }
    }

    /// Flag byte for the superblock.
    pub fn flags(&self) -> u8 {
        let p = match self.primary {
            Holder::Nobody => 0,
            Holder::Me => 1,
            Holder::Peer => 2,
        };
        p | (u8::from(self.me_up_to_date) << 2)
            | (u8::from(self.peer_up_to_date) << 3)
            | (u8::from(self.forced) << 4)
    }

    /// Parses the superblock form; None for undefined bits.
    pub fn from_parts(epoch: u64, flags: u8) -> Option<Self> {
        if flags & !0x1f != 0 {
            return None;
        }
        let primary = match flags & 3 {
            0 => Holder::Nobody,
            1 => Holder::Me,
            2 => Holder::Peer,
            _ => return None,
        };
        Some(RecordView {
            epoch,
            primary,
            me_up_to_date: flags & 4 != 0,
            peer_up_to_date: flags & 8 != 0,
            forced: flags & 16 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_round_trips() {
        let r = Record {
            epoch: 7,
            primary: Some("alpha".into()),
            up_to_date: ["alpha".to_string()].into_iter().collect(),
            forced: true,
        };
        let v = RecordView::of(&r, "alpha", "beta");
        assert_eq!(v.primary, Holder::Me);
        assert!(v.me_up_to_date && !v.peer_up_to_date);
        assert_eq!(v.to_record("alpha", "beta"), r);
        assert_eq!(v.swapped().to_record("beta", "alpha"), r);
        assert_eq!(RecordView::from_parts(v.epoch, v.flags()), Some(v));
        assert_eq!(RecordView::from_parts(1, 0x23), None);
        assert_eq!(RecordView::from_parts(1, 3), None);
    }
}

//! The status report: a stable JSON schema that tools parse (documented in
//! README.md, "Status JSON"). Fields are only ever added, never renamed.

use serde::{Deserialize, Serialize};

use crate::volume::VolumeStatus;

/// Status of the node and its volumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Schema version of this report.
    pub schema: u32,
    /// Node name.
    pub node: String,
    /// Every configured volume (or just the one asked for).
    pub volumes: Vec<VolumeStatusReport>,
    /// The certificates this node depends on and when they expire: its
    /// own, the CA, and those its peers and witness presented (once a
    /// connection with them came up). Absent from older daemons' reports.
    #[serde(default)]
    pub certificates: Vec<CertificateReport>,
}

/// One certificate this node depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateReport {
    /// "node" (this node's), "ca", "peer" or "witness".
    pub kind: String,
    /// The subject's common name.
    pub name: String,
    /// The end of its validity (seconds since the Unix epoch).
    pub not_after_unix_s: i64,
    /// Whole days left (negative: expired that many days ago).
    pub days_left: i64,
    /// Set within 30 days of the end and after it: what expires and what
    /// to do.
    pub warning: Option<String>,
}

impl CertificateReport {
    /// The report of `validity` at `now_unix_s`.
    pub fn new(
        kind: crate::cert::validity::CertificateKind,
        validity: &crate::cert::validity::Validity,
        now_unix_s: i64,
    ) -> Self {
        use crate::cert::validity::Expiry;
        let days_left = match validity.expiry(now_unix_s) {
            Expiry::Valid { days_left } | Expiry::Soon { days_left } => days_left,
            Expiry::Expired { days_ago } => -days_ago,
        };
        CertificateReport {
            kind: kind.as_str().to_string(),
            name: validity.subject.clone(),
            not_after_unix_s: validity.not_after_unix_s,
            days_left,
            warning: crate::cert::validity::warning(kind, validity, now_unix_s),
        }
    }
}

/// Status of one volume on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatusReport {
    /// Volume name.
    pub name: String,
    /// Attached on this node.
    pub attached: bool,
    /// "Primary" or "Secondary" (null when not attached).
    pub role: Option<String>,
    /// "UpToDate", "Outdated", "Inconsistent", "Diskless" (null when not attached).
    pub disk: Option<String>,
    /// Usable size in bytes.
    pub size_bytes: Option<u64>,
    /// Backing disk path.
    pub backing: String,
    /// Where applications connect, when exported (e.g. an NBD URI).
    pub export: Option<String>,
    /// Client requests in flight.
    pub inflight_requests: usize,
    /// Bytes that differ from the peer's copy, per the dirty bitmap.
    pub out_of_sync_bytes: u64,
    /// The peer.
    pub peer: PeerReport,
    /// Resync progress when this node is the sync source.
    pub resync: Option<ResyncReport>,
    /// The last finished resync this node was the source of (how much it
    /// had to copy).
    pub last_resync: Option<ResyncReport>,
    /// A running online verify.
    #[serde(default)]
    pub verify: Option<VerifyReport>,
    /// The last finished (or aborted) online verify.
    #[serde(default)]
    pub last_verify: Option<VerifyReport>,
    /// Activity-log updates written since attach: the metadata cost of
    /// application writes (compare with their number).
    #[serde(default)]
    pub activity_log_updates: u64,
    /// Metadata writes since attach (bitmap pages, activity log and
    /// superblock; concurrent updates share one write).
    #[serde(default)]
    pub metadata_writes: u64,
    /// Current data generation id (hex).
    pub generation: Option<String>,
    /// Requests held back (I/O frozen) because this primary's own copy is
    /// still being resynced and its sync source is unreachable.
    #[serde(default)]
    pub frozen_requests: usize,
    /// This node lost power (an unclean stop, then another boot) and has
    /// not synced with its peer since: its disk may lack acknowledged
    /// writes no flush covered, so it does not promote until it synced.
    #[serde(default)]
    pub power_lost: bool,
    /// Completed writes not yet covered by a flush on every copy (the
    /// primary flushes on its own within about 100 ms).
    #[serde(default)]
    pub unflushed_writes: usize,
    /// Quorum state (null without a witness).
    #[serde(default)]
    pub quorum: Option<QuorumReport>,
}

/// Quorum state of a volume with a witness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuorumReport {
    /// Epoch of the witness record this node last saw (0: none yet).
    pub epoch: u64,
    /// Who the record names primary: "me", "peer" or null.
    pub primary: Option<String>,
    /// The record lists this node as up to date.
    pub up_to_date: bool,
    /// The record lists the peer as up to date.
    pub peer_up_to_date: bool,
    /// The witness answered the last request.
    pub witness_reachable: bool,
    /// A fresh lease (witness or peer) lets this node serve as primary.
    pub lease_valid: bool,
    /// Writes waiting for the witness to outdate the peer (rule 2).
    pub waiting_writes: usize,
    /// Requests held because the primary has no lease (rule 7). (Named
    /// `frozen_requests` before; read under that name too.)
    #[serde(alias = "frozen_requests")]
    pub held_for_lease_requests: usize,
}

/// The peer of a volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Peer node name.
    pub name: String,
    /// "Connected" or "Disconnected".
    pub connection: String,
    /// Relation: InSync, SyncSource, SyncTarget, StartingSyncSource,
    /// DisklessClient, ServingDiskless, NoData, SplitBrain, Refused.
    pub relation: Option<String>,
    /// Why the peer was refused, when relation is Refused.
    pub refused_reason: Option<String>,
    /// Peer's role as it announced it.
    pub role: Option<String>,
    /// Peer's disk state; "Outdated" while disconnected after this node
    /// wrote without it.
    pub disk: Option<String>,
    /// Link round-trip time.
    pub rtt_us: Option<u64>,
    /// While disconnected: why the link is not up (the last connection
    /// failure, or that the peer has not dialed this node yet), and what
    /// to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `last_error` happened (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at_unix_s: Option<u64>,
}

/// Online verify progress or result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Bytes compared.
    pub checked_bytes: u64,
    /// Bytes in the volume.
    pub total_bytes: u64,
    /// Bytes found different (marked out of sync).
    pub mismatched_bytes: u64,
    /// The first differing regions.
    pub mismatches: Vec<Region>,
    /// Stopped early (link lost).
    pub aborted: bool,
}

/// A byte region.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// Offset.
    pub offset: u64,
    /// Length.
    pub bytes: u64,
}

/// Resync progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResyncReport {
    /// Bytes to copy when it started.
    pub total_bytes: u64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// done / total in percent.
    pub percent: f64,
    /// Average copy rate since the resync started (running resync only).
    #[serde(default)]
    pub rate_bytes_per_s: Option<f64>,
    /// Estimated seconds left at that rate (running resync only).
    #[serde(default)]
    pub eta_s: Option<f64>,
}

impl ResyncReport {
    /// Progress of `done_bytes` (capped) out of `total_bytes`; with the
    /// seconds it has run, the rate and the time left.
    fn new(total_bytes: u64, done_bytes: u64, elapsed_s: Option<f64>) -> Self {
        let done = done_bytes.min(total_bytes);
        let rate = elapsed_s.filter(|t| *t > 0.0).map(|t| done as f64 / t);
        ResyncReport {
            total_bytes,
            done_bytes: done,
            percent: if total_bytes == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total_bytes as f64
            },
            rate_bytes_per_s: rate,
            eta_s: rate
                .filter(|r| *r > 0.0)
                .map(|r| (total_bytes - done) as f64 / r),
        }
    }
}

fn name<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|x| x.as_str().map(str::to_string))
}

impl VolumeStatusReport {
    /// A configured but not attached volume.
    pub fn detached(name: &str, backing: &str, peer: &str) -> Self {
        VolumeStatusReport {
            name: name.into(),
            attached: false,
            role: None,
            disk: None,
            size_bytes: None,
            backing: backing.into(),
            export: None,
            inflight_requests: 0,
            out_of_sync_bytes: 0,
            peer: PeerReport {
                name: peer.into(),
                connection: "Disconnected".into(),
                relation: None,
                refused_reason: None,
                role: None,
                disk: None,
                rtt_us: None,
                last_error: None,
                last_error_at_unix_s: None,
            },
            resync: None,
            last_resync: None,
            verify: None,
            last_verify: None,
            activity_log_updates: 0,
            metadata_writes: 0,
            generation: None,
            frozen_requests: 0,
            power_lost: false,
            unflushed_writes: 0,
            quorum: None,
        }
    }

    /// From a live volume.
    pub fn from_volume(name: &str, s: &VolumeStatus, export: Option<String>) -> Self {
        let e = &s.engine;
        let peer_disk = match (&e.peer, s.connected) {
            (Some(p), _) => name_of_disk(p.disk),
            (None, false) if e.generations.bitmap != 0 => Some("Outdated".to_string()),
            _ => None,
        };
        let report = |r: crate::engine::ResyncProgress, elapsed_s: Option<f64>| {
            let total = (r.total_chunks * s.chunk_bytes).min(s.data_bytes);
            ResyncReport::new(total, r.done_chunks * s.chunk_bytes, elapsed_s)
        };
        let resync = e.resync.map(|r| report(r, s.resync_elapsed_s));
        // A sync target shows the resync too, from its own count of what
        // arrived against what the source announced at the start (as DRBD's
        // `done:` shows on both sides).
        let target = s
            .target_progress
            .filter(|_| resync.is_none())
            .map(|t| ResyncReport::new(t.total_bytes, t.received_bytes, Some(t.elapsed_s)));
        let out_of_sync_bytes = match &target {
            Some(t) => e.out_of_sync_bytes.max(t.total_bytes - t.done_bytes),
            None => e.out_of_sync_bytes,
        };
        let resync = resync.or(target);
        let last_resync = e.last_resync.map(|r| report(r, None));
        let verify_report = |v: &crate::engine::VerifyProgress| VerifyReport {
            checked_bytes: (v.checked_chunks * s.chunk_bytes).min(s.data_bytes),
            total_bytes: s.data_bytes,
            mismatched_bytes: (v.mismatched_chunks * s.chunk_bytes).min(s.data_bytes),
            mismatches: v
                .mismatches
                .iter()
                .map(|(first, count)| Region {
                    offset: first * s.chunk_bytes,
                    bytes: count * s.chunk_bytes,
                })
                .collect(),
            aborted: v.aborted,
        };
        let verify = e.verify.as_ref().map(verify_report);
        let last_verify = e.last_verify.as_ref().map(verify_report);
        VolumeStatusReport {
            name: name.into(),
            attached: true,
            role: name_of(&e.role),
            disk: name_of_disk(e.disk),
            size_bytes: Some(s.data_bytes),
            backing: s.disk_path.display().to_string(),
            export,
            inflight_requests: e.inflight_requests,
            out_of_sync_bytes,
            peer: PeerReport {
                name: s.peer_name.clone(),
                connection: if s.connected {
                    "Connected"
                } else {
                    "Disconnected"
                }
                .into(),
                relation: e.relation.map(|r| r.name().to_string()),
                refused_reason: match e.relation {
                    Some(crate::engine::Relation::Refused(why)) => Some(why.to_string()),
                    _ => None,
                },
                role: e.peer.as_ref().and_then(|p| name_of(&p.role)),
                disk: peer_disk,
                rtt_us: s.rtt_us,
                last_error: None,
                last_error_at_unix_s: None,
            },
            resync,
            last_resync,
            verify,
            last_verify,
            activity_log_updates: e.activity_log_updates,
            metadata_writes: s.metadata_writes,
            frozen_requests: e.frozen_requests,
            power_lost: e.cache_lost,
            unflushed_writes: e.unflushed_writes,
            generation: (e.generations.current != 0)
                .then(|| format!("{:016x}", e.generations.current)),
            quorum: s.lease_valid.map(|lease_valid| QuorumReport {
                epoch: e.record.epoch,
                primary: match e.record.primary {
                    crate::quorum::Holder::Me => Some("me".into()),
                    crate::quorum::Holder::Peer => Some("peer".into()),
                    crate::quorum::Holder::Nobody => None,
                },
                up_to_date: e.record.me_up_to_date,
                peer_up_to_date: e.record.peer_up_to_date,
                witness_reachable: s.witness_reachable.unwrap_or(false),
                lease_valid,
                waiting_writes: e.quorum_waiting,
                held_for_lease_requests: s.held_for_lease_requests,
            }),
        }
    }
}

fn name_of<T: Serialize>(v: &T) -> Option<String> {
    name(v)
}

fn name_of_disk(d: crate::meta::DiskState) -> Option<String> {
    name(&d)
}

/// Human-readable rendering of a status report.
pub fn render_text(s: &NodeStatus) -> String {
    let mut out = String::new();
    for v in &s.volumes {
        if !v.attached {
            out.push_str(&format!(
                "{}  not attached on {} (backing {})\n",
                v.name, s.node, v.backing
            ));
            continue;
        }
        out.push_str(&format!(
            "{}  role={} disk={} size={}\n",
            v.name,
            v.role.as_deref().unwrap_or("-"),
            v.disk.as_deref().unwrap_or("-"),
            crate::units::format_bytes(v.size_bytes.unwrap_or(0)),
        ));
        let p = &v.peer;
        out.push_str(&format!(
            "  peer {}: {} {}{}{}\n",
            p.name,
            p.connection,
            p.relation.as_deref().unwrap_or(""),
            match (&p.role, &p.disk) {
                (Some(r), Some(d)) => format!(" ({r}, {d})"),
                (None, Some(d)) => format!(" ({d})"),
                _ => String::new(),
            },
            p.rtt_us.map(|r| format!(" rtt={r}us")).unwrap_or_default(),
        ));
        if let Some(why) = &p.refused_reason {
            out.push_str(&format!("  refused: {why}\n"));
        }
        if let Some(e) = &p.last_error {
            let ago = p
                .last_error_at_unix_s
                .and_then(|at| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()?
                        .as_secs();
                    Some(format!(" ({} s ago)", now.saturating_sub(at)))
                })
                .unwrap_or_default();
            out.push_str(&format!("  connection problem{ago}: {e}\n"));
        }
        if let Some(e) = &v.export {
            out.push_str(&format!("  export: {e}\n"));
        }
        if let Some(q) = &v.quorum {
            out.push_str(&format!(
                "  witness: {} epoch={} primary={} up-to-date: me={} peer={} lease={}{}\n",
                if q.witness_reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                },
                q.epoch,
                q.primary.as_deref().unwrap_or("-"),
                q.up_to_date,
                q.peer_up_to_date,
                if q.lease_valid { "valid" } else { "NONE" },
                if q.waiting_writes + q.held_for_lease_requests > 0 {
                    format!(
                        "  I/O held: {} waiting for quorum, {} for a lease",
                        q.waiting_writes, q.held_for_lease_requests
                    )
                } else {
                    String::new()
                }
            ));
        }
        if v.role.as_deref() == Some("Primary") && v.disk.as_deref() == Some("Inconsistent") {
            out.push_str(&format!(
                "  I/O goes through the sync source {} until this copy is complete\n",
                p.name
            ));
        }
        if v.frozen_requests > 0 {
            out.push_str(&format!(
                "  I/O FROZEN: {} requests wait for the sync source {} (this copy is incomplete)\n",
                v.frozen_requests, p.name
            ));
        }
        if v.power_lost {
            out.push_str(&format!(
                "  LOST POWER: this copy may lack writes {} acknowledged; it promotes only once it synced from {}\n",
                p.name, p.name
            ));
        }
        out.push_str(&format!(
            "  out-of-sync: {}  in-flight: {}\n",
            crate::units::format_bytes(v.out_of_sync_bytes),
            v.inflight_requests
        ));
        if let Some(r) = &v.resync {
            out.push_str(&format!("  resync: {}\n", resync_line(r)));
        }
    }
    if !s.certificates.is_empty() {
        let each: Vec<String> = s
            .certificates
            .iter()
            .map(|c| format!("{} {} {} days", c.kind, c.name, c.days_left))
            .collect();
        out.push_str(&format!("certificates: {}\n", each.join(", ")));
        for c in &s.certificates {
            if let Some(w) = &c.warning {
                out.push_str(&format!("  CERTIFICATE: {w}\n"));
            }
        }
    }
    out
}

/// One line describing a running resync: percent, amounts, rate and ETA.
pub fn resync_line(r: &ResyncReport) -> String {
    let mut line = format!(
        "{:.1}% ({} of {})",
        r.percent,
        crate::units::format_bytes(r.done_bytes),
        crate::units::format_bytes(r.total_bytes)
    );
    if let Some(rate) = r.rate_bytes_per_s {
        line.push_str(&format!(
            " at {}/s",
            crate::units::format_bytes(rate as u64)
        ));
    }
    if let Some(eta) = r.eta_s {
        line.push_str(&format!(", ETA {}s", eta.ceil() as u64));
    }
    line
}

/// One line of `status --watch` for a volume (plain output).
pub fn watch_line(v: &VolumeStatusReport) -> String {
    if !v.attached {
        return format!("{} not attached", v.name);
    }
    let state = format!(
        "{} {} {}/{}",
        v.name,
        v.peer.relation.as_deref().unwrap_or(&v.peer.connection),
        v.disk.as_deref().unwrap_or("-"),
        v.peer.disk.as_deref().unwrap_or("-"),
    );
    match &v.resync {
        Some(r) => format!("{state} resync {}", resync_line(r)),
        None => format!(
            "{state} out-of-sync {}",
            crate::units::format_bytes(v.out_of_sync_bytes)
        ),
    }
}

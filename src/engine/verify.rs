//! Online verify (digests of every chunk compared with the peer's) and the
//! on-demand resync of what it marked.

use super::*;

/// Mismatch runs kept for the report.
const VERIFY_REPORT_RUNS_MAX: usize = 64;

impl Engine {
    /// Starts comparing every chunk's digest with the peer's. Mismatching
    /// chunks are marked out of sync (fix them with `request_resync`).
    pub fn start_verify(&mut self) -> Result<(), MaintenanceError> {
        let Some((view, rel)) = self.peer else {
            return Err(MaintenanceError::NotInSync("disconnected"));
        };
        if rel != Relation::InSync || self.disk != DiskState::UpToDate {
            return Err(MaintenanceError::NotInSync(rel.name()));
        }
        if view.role == Role::Primary {
            return Err(MaintenanceError::PeerPrimary);
        }
        if self.verify.is_some() {
            return Err(MaintenanceError::Busy);
        }
        self.verify = Some(VerifyProgress {
            total_chunks: self.bitmap.chunks(),
            ..Default::default()
        });
        self.pump_verify();
        self.check_invariants();
        Ok(())
    }

    pub(super) fn pump_verify(&mut self) {
        let Some(mut prog) = self.verify.take() else {
            return;
        };
        let mut started = Vec::new();
        while prog.inflight < RESYNC_WINDOW && prog.cursor < prog.total_chunks {
            let chunk = prog.cursor;
            prog.cursor += 1;
            prog.inflight += 1;
            let (id, may_start) = self.insert_chunk_request(Op::VerifyChunk, chunk, 1);
            if may_start {
                started.push(id);
            }
        }
        if prog.inflight == 0 && prog.cursor >= prog.total_chunks {
            self.last_verify = Some(prog);
            self.persist();
            self.actions.push_back(Action::Notify(Notice::VerifyDone));
            return;
        }
        self.verify = Some(prog);
        for id in started {
            self.start(id);
        }
    }

    /// A verify chunk finished: `equal` says whether both digests matched
    /// (None: it could not be compared).
    pub fn verify_done(&mut self, id: RequestId, equal: Option<bool>) {
        let Some(r) = self.table.requests.get(&id) else {
            return;
        };
        if r.op != Op::VerifyChunk {
            return;
        }
        let chunk = r.range.offset / self.cfg.chunk_bytes;
        let range = r.range;
        if let Some(p) = self.verify.as_mut() {
            p.inflight = p.inflight.saturating_sub(1);
            if equal.is_some() {
                p.checked_chunks += 1;
            }
            if equal == Some(false) {
                p.mismatched_chunks += 1;
                let extends = matches!(p.mismatches.last(), Some((f, c)) if f + c == chunk);
                if extends {
                    if let Some((_, c)) = p.mismatches.last_mut() {
                        *c += 1;
                    }
                } else if p.mismatches.len() < VERIFY_REPORT_RUNS_MAX {
                    p.mismatches.push((chunk, 1));
                }
            }
        }
        if equal == Some(false) {
            let pages = self.bitmap.set_range(range.offset, range.len);
            self.next_meta.pages.extend(pages);
        }
        self.finish(id);
        self.pump_verify();
        self.after_event();
    }

    /// Resyncs the chunks this node has marked out of sync (after a verify).
    pub fn request_resync(&mut self) -> Result<bool, MaintenanceError> {
        let Some((view, rel)) = self.peer else {
            return Err(MaintenanceError::NotInSync("disconnected"));
        };
        if self.bitmap.set_count() == 0 {
            return Ok(false);
        }
        if view.role == Role::Primary {
            return Err(MaintenanceError::PeerPrimary);
        }
        if rel != Relation::InSync {
            return Err(MaintenanceError::NotInSync(rel.name()));
        }
        // The peer renegotiates when it sees our dirty bits and becomes the
        // target; this node becomes the source.
        self.renegotiate();
        self.after_event();
        Ok(true)
    }
}

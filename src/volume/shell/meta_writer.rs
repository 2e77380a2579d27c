//! The metadata writer: the engine's metadata writes (and the detach's
//! final one) in strict order, folded into one device write when several
//! are queued (group commit), each reported back as `Input::MetaDone`;
//! and the replies that wait for one to be durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::Shell;
use crate::engine::MetaToken;
use crate::meta::{DiskState, MetaDevice, MetaError, Superblock};
use crate::store::BlockStore;
use crate::volume::{Input, VolumeError};

/// Which metadata write a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaWrite {
    /// One of the engine's, in its sequence.
    Engine(MetaToken),
    /// The final write of a clean detach (after every engine write).
    Detach,
}

/// One metadata write: the state to record, with the bitmap pages and the
/// activity-log snapshot that go with it.
pub(super) struct MetaJob {
    pub(super) write: MetaWrite,
    pub(super) activity_log: Option<crate::meta::activity_log::AlSnapshot>,
    pub(super) disk: DiskState,
    pub(super) generations: crate::meta::Generations,
    pub(super) primary: bool,
    pub(super) attached: bool,
    pub(super) pages: Vec<(u32, Box<[u8; crate::meta::bitmap::BITMAP_PAGE_BYTES]>)>,
    pub(super) record: crate::quorum::RecordView,
    pub(super) cache_lost: bool,
    /// Flush the data disk before this write: a new generation starts
    /// (see `Engine::start_tracking`), or the volume detaches cleanly.
    pub(super) flush_data: bool,
}

/// Writes metadata jobs strictly in order.
pub(super) async fn write_in_order(
    meta: MetaDevice,
    store: Arc<dyn BlockStore>,
    mut sb: Superblock,
    mut rx: mpsc::UnboundedReceiver<MetaJob>,
    done: mpsc::UnboundedSender<Input>,
    writes: Arc<AtomicU64>,
) {
    let meta = Arc::new(meta);
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        // Group commit: every job already queued behind this one is folded
        // into a single write (under scattered writes at depth 32, one
        // activity-log update instead of up to 32 in a row). The detach
        // job keeps its own write, after the others.
        let mut job = first;
        let mut detach = None;
        while job.write != MetaWrite::Detach {
            match rx.try_recv() {
                Ok(next) if next.write == MetaWrite::Detach => {
                    detach = Some(next);
                    break;
                }
                Ok(next) => job = job.then(next),
                Err(_) => break,
            }
        }
        for mut job in std::iter::once(job).chain(detach) {
            let write = job.write;
            if job.flush_data && !failed && store.flush().await.is_err() {
                // Neither a new generation nor the clean-stop mark without
                // every completed write durable first.
                tracing::error!("the data disk failed to flush before a metadata write");
                failed = true;
                if !job.attached {
                    job.attached = true;
                }
            }
            let ok = !failed && write_meta_job(&meta, &mut sb, job).await;
            failed |= !ok;
            if ok {
                writes.fetch_add(1, Ordering::Relaxed);
            }
            let _ = done.send(Input::MetaDone { write, ok });
        }
    }
}

impl MetaJob {
    /// This job followed by `next`: the newer state, the newer activity-log
    /// snapshot (it holds every extent with writes in flight), every bitmap
    /// page (the newer copy of a page wins), and the newer token (never
    /// the detach's: it is never folded).
    fn then(mut self, next: MetaJob) -> MetaJob {
        let mut pages = std::mem::take(&mut self.pages);
        pages.retain(|(p, _)| !next.pages.iter().any(|(q, _)| q == p));
        pages.extend(next.pages);
        MetaJob {
            write: next.write,
            activity_log: next.activity_log.or(self.activity_log),
            disk: next.disk,
            generations: next.generations,
            primary: next.primary,
            attached: next.attached,
            pages,
            record: next.record,
            cache_lost: next.cache_lost,
            flush_data: self.flush_data || next.flush_data,
        }
    }
}

/// Writes one job's bitmap pages, activity log and superblock; false (and
/// logged) when the metadata device failed.
async fn write_meta_job(meta: &Arc<MetaDevice>, sb: &mut Superblock, job: MetaJob) -> bool {
    sb.seq += 1;
    sb.disk_state = job.disk;
    sb.generations = job.generations;
    sb.primary = job.primary;
    sb.attached = job.attached;
    sb.record = job.record;
    sb.cache_lost = job.cache_lost;
    let m = meta.clone();
    let s = sb.clone();
    let pages = job.pages;
    let al = job.activity_log;
    let res = tokio::task::spawn_blocking(move || -> Result<(), MetaError> {
        for (page, bytes) in &pages {
            m.write_page_bytes(*page, &bytes[..])?;
        }
        if let Some(al) = &al {
            m.write_activity_log(al)?;
        }
        m.write_superblock(&s)
    })
    .await;
    let ok = matches!(res, Ok(Ok(())));
    if !ok {
        tracing::error!("metadata write failed: {:?}", res.map(|r| r.err()));
    }
    ok
}

impl Shell {
    /// A metadata write finished: the engine learns of it, and the replies
    /// that waited for it (or an earlier one) are sent.
    pub(super) fn meta_done(&mut self, write: MetaWrite, ok: bool) {
        let MetaWrite::Engine(token) = write else {
            self.detach_write_done = Some(ok);
            return;
        };
        if ok {
            self.engine.meta_persisted(token);
        } else {
            self.engine.meta_failed();
        }
        let persisted = ok;
        let mut keep = Vec::new();
        for (t, reply) in self.meta_waiters.drain(..) {
            if t <= token {
                let _ = reply.send(if persisted {
                    Ok(())
                } else {
                    Err(VolumeError::Other("metadata write failed".into()))
                });
            } else {
                keep.push((t, reply));
            }
        }
        self.meta_waiters = keep;
    }

    /// Answers `reply` once the engine's metadata write `token` is durable
    /// (None: at once).
    pub(super) fn wait_meta(
        &mut self,
        token: Option<MetaToken>,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        match token {
            Some(t) if !self.engine.meta_durable(token) => self.meta_waiters.push((t, reply)),
            // Nothing new to persist (e.g. demoting a secondary).
            _ => {
                let _ = reply.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MetaToken;
    use crate::meta::DiskState;
    use crate::meta::activity_log::AlSnapshot;
    use crate::meta::bitmap::BITMAP_PAGE_BYTES;

    fn job(token: u64, al_seq: Option<u64>, pages: &[(u32, u8)]) -> MetaJob {
        MetaJob {
            write: MetaWrite::Engine(MetaToken::from_seq(token).expect("token 1 or later")),
            activity_log: al_seq.map(|seq| AlSnapshot {
                seq,
                extent_bytes: 4 << 20,
                extents: vec![seq as u32],
            }),
            disk: DiskState::UpToDate,
            generations: crate::meta::Generations {
                current: token,
                ..Default::default()
            },
            primary: token % 2 == 0,
            attached: true,
            pages: pages
                .iter()
                .map(|&(p, fill)| (p, Box::new([fill; BITMAP_PAGE_BYTES])))
                .collect(),
            record: Default::default(),
            cache_lost: false,
            flush_data: false,
        }
    }

    #[test]
    fn folded_metadata_jobs_keep_the_newest_of_everything() {
        let merged = job(1, Some(10), &[(0, 1), (5, 1)])
            .then(job(2, None, &[(5, 2), (7, 2)]))
            .then(job(3, Some(11), &[]));
        assert_eq!(
            merged.write,
            MetaWrite::Engine(MetaToken::from_seq(3).expect("token"))
        );
        assert_eq!(merged.generations.current, 3);
        assert!(!merged.primary);
        assert_eq!(merged.activity_log.map(|a| a.seq), Some(11));
        let mut pages: Vec<(u32, u8)> = merged.pages.iter().map(|(p, b)| (*p, b[0])).collect();
        pages.sort_unstable();
        assert_eq!(pages, vec![(0, 1), (5, 2), (7, 2)]);
        // A newer job without a snapshot keeps the older one.
        let kept = job(1, Some(10), &[]).then(job(2, None, &[]));
        assert_eq!(kept.activity_log.map(|a| a.seq), Some(10));
    }
}

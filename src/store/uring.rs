//! One io_uring shared by every volume of the daemon, driven from the tokio
//! runtime itself: callers push their operation (which owns its buffer until
//! it completes) and submit it from their own thread, and the ring's
//! completion eventfd is registered with tokio's reactor, so a completion
//! wakes exactly the task that reaps it. No extra thread sits between a
//! request and the disk (each cross-thread wake-up costs tens of
//! microseconds on a VM).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, opcode, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::aligned::AlignedBuf;

/// Submission queue entries of the shared ring.
pub const RING_ENTRIES: u32 = 256;
/// Operations in flight in the kernel at once; more wait in a backlog.
const INFLIGHT_MAX: usize = RING_ENTRIES as usize;

/// One I/O operation; it owns everything the kernel touches.
pub enum UringOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// File to read.
        file: Arc<File>,
        /// Destination.
        buf: AlignedBuf,
        /// Byte offset.
        offset: u64,
    },
    /// Write `buf` at `offset`; `fua` makes it durable before completing.
    Write {
        /// File to write.
        file: Arc<File>,
        /// Source.
        buf: Arc<AlignedBuf>,
        /// Byte offset.
        offset: u64,
        /// RWF_DSYNC.
        fua: bool,
    },
    /// fdatasync.
    Flush {
        /// File to sync.
        file: Arc<File>,
    },
}

/// What comes back: the operation (with its buffer) and the result.
pub struct UringDone {
    /// The submitted operation, returned so its buffer can be reused.
    pub op: UringOp,
    /// Bytes transferred, or the OS error.
    pub result: std::io::Result<usize>,
}

struct Slot {
    op: UringOp,
    reply: oneshot::Sender<UringDone>,
}

struct RingState {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<u64>,
    backlog: VecDeque<Slot>,
    inflight: usize,
}

struct Shared {
    state: Mutex<RingState>,
    completions: AsyncFd<OwnedFd>,
}

/// Handle to the ring; cheap to clone.
#[derive(Clone)]
pub struct Uring {
    shared: Arc<Shared>,
}

/// The ring is unusable (its lock was poisoned or the kernel refused it).
#[derive(Debug, thiserror::Error)]
#[error("the io_uring is not usable")]
pub struct UringStopped;

impl Uring {
    /// Creates the ring and starts its completion task. Must be called on a
    /// tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // SAFETY: `efd` is a valid, open descriptor owned by the AsyncFd for
        // its whole lifetime, and OwnedFd always returns that same fd.
        let completions =
            unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }?;
        let shared = Arc::new(Shared {
            state: Mutex::new(RingState {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
                inflight: 0,
            }),
            completions,
        });
        tokio::spawn(reap_loop(Arc::downgrade(&shared)));
        Ok(Uring { shared })
    }

    /// Submits `op` and waits for its completion.
    pub async fn submit(&self, op: UringOp) -> Result<UringDone, UringStopped> {
        let (reply, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock().map_err(|_| UringStopped)?;
            st.backlog.push_back(Slot { op, reply });
            st.push_backlog().map_err(|_| UringStopped)?;
        }
        rx.await.map_err(|_| UringStopped)
    }
}

impl RingState {
    /// Moves waiting operations into the submission queue and submits them.
    fn push_backlog(&mut self) -> std::io::Result<()> {
        let mut pushed = false;
        while self.inflight < INFLIGHT_MAX {
            let Some(mut slot) = self.backlog.pop_front() else {
                break;
            };
            let token = match self.free.pop() {
                Some(t) => t,
                None => {
                    self.slots.push(None);
                    (self.slots.len() - 1) as u64
                }
            };
            let entry = entry_for(&mut slot.op, token);
            // SAFETY: the buffer and file referenced by the entry are owned
            // by the slot stored below, which is kept until the completion
            // for `token` is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // Submission queue full: flush it and retry this one.
                self.free.push(token);
                self.backlog.push_front(slot);
                self.ring.submit()?;
                continue;
            }
            self.slots[token as usize] = Some(slot);
            self.inflight += 1;
            pushed = true;
        }
        if pushed {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Completes every finished operation.
    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            let Some(slot) = self.slots.get_mut(token as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(token);
            self.inflight -= 1;
            let want = expected_len(&slot.op);
            let result = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else if res as usize != want {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short I/O: {res} of {want} bytes"),
                ))
            } else {
                Ok(res as usize)
            };
            let _ = slot.reply.send(UringDone {
                op: slot.op,
                result,
            });
        }
    }
}

/// Waits for completion notifications and hands results to their callers.
async fn reap_loop(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(sh) = shared.upgrade() else { return };
        let Ok(mut guard) = sh.completions.readable().await else {
            return;
        };
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from an
        // eventfd we own.
        let n = unsafe {
            libc::read(
                guard.get_inner().as_raw_fd(),
                counter.as_mut_ptr() as *mut libc::c_void,
                8,
            )
        };
        // Whether or not the counter was set (EAGAIN: a previous pass reaped
        // what it announced), the notification is consumed: clear the
        // readiness now instead of reading again to hit EAGAIN. A completion
        // posted after this read signals the eventfd again, and tokio keeps
        // the fd ready when that new edge arrived before this clear.
        guard.clear_ready();
        if n < 0 {
            continue;
        }
        let Ok(mut st) = sh.state.lock() else { return };
        st.reap();
        if let Err(e) = st.push_backlog() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }
}
fn entry_for(op: &mut UringOp, token: u64) -> io_uring::squeue::Entry {
    match op {
        UringOp::Read { file, buf, offset } => opcode::Read::new(
            types::Fd(file.as_raw_fd()),
            buf.as_mut_ptr(),
            buf.len() as u32,
        )
        .offset(*offset)
        .build()
        .user_data(token),
        UringOp::Write {
            file,
            buf,
            offset,
            fua,
        } => {
            let flags = if *fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), buf.len() as u32)
                .offset(*offset)
                .rw_flags(flags)
                .build()
                .user_data(token)
        }
        UringOp::Flush { file } => opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(token),
    }
}

fn expected_len(op: &UringOp) -> usize {
    match op {
        UringOp::Read { buf, .. } => buf.len(),
        UringOp::Write { buf, .. } => buf.len(),
        UringOp::Flush { .. } => 0,
    }
}

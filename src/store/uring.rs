//! One io_uring driven by a dedicated thread, shared by every volume of the
//! daemon. Callers hand over an operation (which owns its buffer until it
//! completes) and await a oneshot reply. The thread keeps a read armed on an
//! eventfd, so a new submission wakes it even while it waits for
//! completions.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;

use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

use super::aligned::AlignedBuf;

/// Submission queue entries of the shared ring.
pub const RING_ENTRIES: u32 = 256;
/// Operations in flight in the kernel at once; more wait in the thread.
const INFLIGHT_MAX: usize = RING_ENTRIES as usize;
const EVENTFD_TOKEN: u64 = u64::MAX;

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

struct Submission {
    op: UringOp,
    reply: oneshot::Sender<UringDone>,
}

/// Handle to the ring thread; cheap to clone.
#[derive(Clone)]
pub struct Uring {
    tx: mpsc::Sender<Submission>,
    wake: Arc<OwnedFd>,
}

/// The ring thread is gone (it only stops when every handle is dropped, or
/// when the ring itself failed).
#[derive(Debug, thiserror::Error)]
#[error("the io_uring thread has stopped")]
pub struct UringStopped;

impl Uring {
    /// Creates the ring and starts its thread.
    pub fn start() -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("blkrep-uring".into())
            .spawn(move || {
                if let Err(e) = run(ring, rx, &thread_wake) {
                    tracing::error!("io_uring thread failed: {e}");
                }
            })?;
        Ok(Uring { tx, wake })
    }

    /// Submits `op` and waits for its completion.
    pub async fn submit(&self, op: UringOp) -> Result<UringDone, UringStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission { op, reply })
            .map_err(|_| UringStopped)?;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        rx.await.map_err(|_| UringStopped)
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

fn run(mut ring: IoUring, rx: mpsc::Receiver<Submission>, wake: &OwnedFd) -> std::io::Result<()> {
    let mut slots: Vec<Option<Submission>> = Vec::new();
    let mut free: Vec<u64> = Vec::new();
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut inflight = 0usize;
    let mut wake_buf = [0u8; 8];
    let mut arm_wake = true;
    let mut senders_gone = false;
    loop {
        if arm_wake && !senders_gone {
            let e = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(EVENTFD_TOKEN);
            // SAFETY: wake_buf lives for the whole loop, i.e. until the
            // read completes or the ring is dropped.
            if unsafe { ring.submission().push(&e) }.is_err() {
                ring.submit()?;
                continue;
            }
            arm_wake = false;
        }
        while inflight < INFLIGHT_MAX {
            let Some(mut sub) = waiting.pop_front() else {
                break;
            };
            let token = match free.pop() {
                Some(t) => t,
                None => {
                    slots.push(None);
                    (slots.len() - 1) as u64
                }
            };
            let entry = entry_for(&mut sub.op, token);
            slots[token as usize] = Some(sub);
            // SAFETY: the buffer and file referenced by the entry are owned
            // by the submission stored in `slots`, which is kept until the
            // completion for `token` arrives.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                ring.submit()?;
                let sub = slots[token as usize].take();
                free.push(token);
                if let Some(sub) = sub {
                    waiting.push_front(sub);
                }
                continue;
            }
            inflight += 1;
        }
        if senders_gone && inflight == 0 && waiting.is_empty() {
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            if token == EVENTFD_TOKEN {
                arm_wake = true;
                loop {
                    match rx.try_recv() {
                        Ok(sub) => waiting.push_back(sub),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            senders_gone = true;
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(sub) = slots.get_mut(token as usize).and_then(Option::take) else {
                continue;
            };
            free.push(token);
            inflight -= 1;
            let result = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else if res as usize != expected_len(&sub.op) {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short I/O: {res} of {} bytes", expected_len(&sub.op)),
                ))
            } else {
                Ok(res as usize)
            };
            let _ = sub.reply.send(UringDone { op: sub.op, result });
        }
    }
}

//! The local backing store: the only code that touches the data area of the
//! backing disk. `UringStore` is the production implementation (io_uring,
//! O_DIRECT; flush = fdatasync; FUA = RWF_DSYNC); `FaultyStore` wraps any store
//! and injects I/O errors and torn writes for tests and drills.

pub mod aligned;
pub mod backing;
pub mod faulty;
pub mod uring;

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

pub use aligned::AlignedBuf;
pub use faulty::{FaultPlan, FaultyStore};
use uring::{Uring, UringOp};

/// Errors of the local store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk returned an error.
    #[error("local disk I/O error on {path}: {source}")]
    Io {
        /// Backing path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request does not fit the volume or is misaligned.
    #[error("request at {offset}+{len} is outside the volume or not 4 KiB aligned")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// An injected fault (tests and drills only).
    #[error("injected disk fault")]
    Injected,
    /// The I/O thread is gone.
    #[error("local I/O engine stopped")]
    Stopped,
}

/// A boxed I/O future.
pub type IoFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// A block store over the volume's data area.
pub trait BlockStore: Send + Sync + 'static {
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> IoFuture<AlignedBuf>;
    /// Writes `buf` at `offset`; with `fua` it is durable when this completes.
    fn write(&self, offset: u64, buf: Arc<AlignedBuf>, fua: bool) -> IoFuture<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<()>;
    /// Makes `[offset, offset+len)` read back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<()>;
    /// Size of the data area.
    fn size_bytes(&self) -> u64;
}

/// The production store: io_uring with O_DIRECT on a file or block device.
pub struct UringStore {
    file: Arc<File>,
    path: PathBuf,
    ring: Uring,
    data_bytes: u64,
}

impl UringStore {
    /// Opens `path` whose first `data_bytes` are the volume's data.
    pub fn open(path: &Path, data_bytes: u64, ring: Uring) -> Result<Self, StoreError> {
        let file = backing::open_direct(path, true).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(UringStore {
            file: Arc::new(file),
            path: path.to_path_buf(),
            ring,
            data_bytes,
        })
    }
}

/// Checks that an I/O lies inside the data area and is 4 KiB aligned.
pub fn check_range(offset: u64, len: u64, data_bytes: u64) -> Result<(), StoreError> {
    let aligned =
        offset % aligned::BUF_ALIGN_BYTES as u64 == 0 && len % aligned::BUF_ALIGN_BYTES as u64 == 0;
    match offset.checked_add(len) {
        Some(end) if aligned && end <= data_bytes => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, len }),
    }
}

impl BlockStore for UringStore {
    fn read(&self, offset: u64, len: usize) -> IoFuture<AlignedBuf> {
        // Checked before the buffer is allocated (the length may come
        // from a peer).
        if let Err(e) = check_range(offset, len as u64, self.data_bytes) {
            return Box::pin(async move { Err(e) });
        }
        let op = UringOp::Read {
            file: self.file.clone(),
            buf: AlignedBuf::zeroed(len),
            offset,
        };
        let ring = self.ring.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let done = ring.submit(op).await.map_err(|_| StoreError::Stopped)?;
            done.result.map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })?;
            match done.op {
                UringOp::Read { buf, .. } => Ok(buf),
                _ => Err(StoreError::Stopped),
            }
        })
    }

    fn write(&self, offset: u64, buf: Arc<AlignedBuf>, fua: bool) -> IoFuture<()> {
        let checked = check_range(offset, buf.len() as u64, self.data_bytes);
        let op = UringOp::Write {
            file: self.file.clone(),
            buf,
            offset,
            fua,
        };
        let ring = self.ring.clone();
        let path = self.path.clone();
        Box::pin(async move {
            checked?;
            let done = ring.submit(op).await.map_err(|_| StoreError::Stopped)?;
            done.result.map(|_| ()).map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })
        })
    }

    fn flush(&self) -> IoFuture<()> {
        let op = UringOp::Flush {
            file: self.file.clone(),
        };
        let ring = self.ring.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let done = ring.submit(op).await.map_err(|_| StoreError::Stopped)?;
            done.result.map(|_| ()).map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<()> {
        let checked = check_range(offset, len, self.data_bytes);
        let file = self.file.clone();
        let err_path = self.path.display().to_string();
        Box::pin(async move {
            checked?;
            let res = tokio::task::spawn_blocking(move || backing::zero_range(&file, offset, len))
                .await
                .map_err(|_| StoreError::Stopped)?;
            res.map_err(|source| StoreError::Io {
                path: err_path,
                source,
            })
        })
    }

    fn size_bytes(&self) -> u64 {
        self.data_bytes
    }
}

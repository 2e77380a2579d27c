//! Opening backing files and block devices, and learning their size.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Opens `path` for O_DIRECT I/O (read-write when `write`). With `write` the
/// file is also opened O_DSYNC only by callers that ask for it separately.
pub fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Opens `path` for durable O_DIRECT writes (every write is O_DSYNC).
pub fn open_direct_dsync(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
}

/// Whether `file` is a block device.
pub fn is_block_device(file: &File) -> std::io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Size in bytes of a regular file or block device.
pub fn size_bytes(file: &File) -> std::io::Result<u64> {
    if is_block_device(file)? {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the fd is valid for the lifetime of `file`, and the ioctl
        // writes exactly one u64 into `size`, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// Zeroes `[offset, offset+len)` so that it reads back as zeros, cheaply:
/// a punched hole in a regular file, BLKZEROOUT on a block device.
pub fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if is_block_device(file)? {
        // BLKZEROOUT = _IO(0x12, 127)
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range = [offset, len];
        // SAFETY: the fd is valid, and BLKZEROOUT reads two u64 from `range`,
        // which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    let (off, n) = (
        i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
        i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    // SAFETY: plain syscall on a valid fd with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

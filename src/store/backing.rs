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

/// Whether the kernel reports that the block device behind `path` has no
/// volatile write cache (`/sys/dev/block/M:m/queue/write_cache` reads
/// "write through"; for a partition, its disk's). False for regular files:
/// a filesystem may still hold a completed O_DIRECT write's allocation in
/// its journal until a flush, whatever the device does.
pub fn kernel_reports_write_through(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.file_type().is_block_device() {
        return false;
    }
    let rdev = meta.rdev();
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    ["queue/write_cache", "../queue/write_cache"]
        .iter()
        .find_map(|rel| std::fs::read_to_string(format!("{dev}/{rel}")).ok())
        .is_some_and(|s| s.trim() == "write through")
}

/// The running kernel's boot id (`/proc/sys/kernel/random/boot_id`), or
/// None when it cannot be read.
pub fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(s, 16).ok()?;
    }
    (id != [0; 16]).then_some(id)
}

/// Makes every completed write to `path` durable (fdatasync of the file or
/// block device: the device's cache is flushed).
pub fn sync_data(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().write(true).open(path)?.sync_data()
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn the_boot_id_is_read_and_files_are_never_write_through() {
        assert!(boot_id().is_some(), "Linux always has a boot id");
        assert_eq!(boot_id(), boot_id());
        let f = std::env::temp_dir().join(format!("blkrep-wt-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert!(!kernel_reports_write_through(&f));
        std::fs::remove_file(&f).unwrap();
    }
}

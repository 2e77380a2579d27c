//! The ublk frontend: exposes a volume as `/dev/ublkbN` through the kernel's
//! ublk driver, using the `libublk` crate for the ublk protocol.
//!
//! libublk runs one thread per queue, each with its own io_uring and a small
//! local executor. Each request is handed to the volume on the tokio runtime;
//! when the volume completes it, the tokio side writes an eventfd on which the
//! queue thread keeps a read armed in its own ring, so the queue thread wakes
//! at once instead of sleeping in io_uring_enter until some unrelated
//! completion (the hand-off pattern of rublk's notifier).
//!
//! Device parameters: 4 KiB logical and physical blocks (the volume's unit),
//! volatile write cache and FUA advertised so the kernel sends FLUSH and FUA,
//! discard and write-zeroes (both replicated as zeroing), non-rotational.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkFlags, UblkUringData};

use crate::store::AlignedBuf;
use crate::volume::{VolumeError, VolumeHandle};

/// Path of the ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";
/// Largest single request (bytes); matches the volume's piece size.
pub const IO_BUF_BYTES: u32 = 1 << 20;

/// ublk frontend errors.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The kernel has no ublk driver loaded.
    #[error(
        "this kernel has no ublk driver ({UBLK_CONTROL} is missing): load it with `modprobe ublk_drv` \
         (Linux 6.0+, CONFIG_BLK_DEV_UBLK), or export the volume over NBD instead (export = \"nbd\")"
    )]
    NoDriver,
    /// libublk refused.
    #[error("ublk: {0}")]
    Lib(String),
    /// The device did not come up in time.
    #[error("ublk device did not start within {0:?}")]
    Timeout(Duration),
}

/// Queue layout of a ublk device.
#[derive(Clone, Copy, Debug)]
pub struct UblkOptions {
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Use UBLK_F_USER_COPY when the kernel offers it.
    pub user_copy: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            queues: 1,
            depth: 64,
            user_copy: true,
        }
    }
}

/// The kernel driver's feature bits, or why ublk cannot be used.
pub fn driver_features() -> Result<u64, UblkError> {
    if !std::path::Path::new(UBLK_CONTROL).exists() {
        return Err(UblkError::NoDriver);
    }
    UblkCtrl::get_features().ok_or(UblkError::NoDriver)
}

/// A running ublk device.
pub struct UblkExport {
    dev_id: i32,
    recovered: bool,
    id_file: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The file that records which ublk device serves `volume`.
pub fn id_file(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join(format!("{volume}.ublk"))
}

/// A device left behind by a daemon that died, waiting for user recovery.
fn quiesced_device(id_file: &Path) -> Option<i32> {
    let id: i32 = std::fs::read_to_string(id_file).ok()?.trim().parse().ok()?;
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(id).ok()?;
    (ctrl.dev_info().state == libublk::sys::UBLK_S_DEV_QUIESCED as u16).then_some(id)
}

/// Highest ublk device id tried (the kernel's limit is 1 << 20; a host
/// with this many ublk devices has bigger problems).
const DEVICE_ID_MAX: i32 = 4096;

/// How often a device is added again with another id when the one picked
/// was taken in between (by another export starting at the same time in
/// another process).
const ADD_ATTEMPTS_MAX: usize = 16;

/// Held while an export of this process picks an id, records it and adds
/// the device with it, so two exports starting together pick two ids.
static ADDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lowest ublk device id not in use and at least `from`.
fn free_device_id(from: i32) -> Option<i32> {
    (from..DEVICE_ID_MAX).find(|i| !Path::new(&format!("/sys/class/ublk-char/ublkc{i}")).exists())
}

/// Adds a new device with an id picked here, recorded in `id_file` before
/// the device exists, so the udev rule names it /dev/blkrep/VOLUME on its
/// add event and a restarted daemon recovers its own device. The kernel
/// refuses an id in use (EEXIST): then the next free one is tried.
fn add_device<Ctrl>(
    id_file: &Path,
    add: impl Fn(i32) -> Result<Ctrl, libublk::UblkError>,
) -> Result<Ctrl, libublk::UblkError> {
    let _adding = ADDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut from = 0;
    for _ in 0..ADD_ATTEMPTS_MAX {
        let Some(id) = free_device_id(from) else {
            break;
        };
        if let Some(dir) = id_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(id_file, format!("{id}\n"))?;
        match add(id) {
            Err(libublk::UblkError::UringIOError(e)) if e == -libc::EEXIST => {
                tracing::debug!("/dev/ublkb{id} was taken meanwhile; trying the next id");
                from = id + 1;
            }
            Err(e) => {
                let _ = std::fs::remove_file(id_file);
                return Err(e);
            }
            Ok(ctrl) => return Ok(ctrl),
        }
    }
    let _ = std::fs::remove_file(id_file);
    Err(libublk::UblkError::OtherError(-libc::ENOSPC))
}

/// Removes a device of `volume` left behind by a dead daemon (its I/O then
/// fails instead of waiting forever). Called when another node took over.
pub fn remove_stale(state_dir: &Path, volume: &str) {
    let f = id_file(state_dir, volume);
    if let Some(id) = quiesced_device(&f) {
        tracing::warn!(
            "volume {volume}: removing /dev/ublkb{id} left by a daemon that died; the peer is primary now"
        );
        if let Ok(c) = UblkCtrl::new_simple(id) {
            let _ = c.del_dev();
        }
    }
    let _ = std::fs::remove_file(f);
}

impl UblkExport {
    /// Creates `/dev/ublkbN` for `volume` and serves it from queue threads.
    /// When a device of this volume was left quiesced by a daemon that died,
    /// it is recovered instead (I/O that waited on it resumes).
    pub fn start(
        volume: VolumeHandle,
        opts: UblkOptions,
        state_dir: &Path,
    ) -> Result<Self, UblkError> {
        let features = driver_features()?;
        // Plain copy mode works on every kernel; user recovery lets a
        // restarted daemon take the device over when the kernel has it.
        let mut ctrl_flags = 0u64;
        if features & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) != 0 {
            ctrl_flags |= u64::from(libublk::sys::UBLK_F_USER_RECOVERY);
        }
        if opts.user_copy && features & u64::from(libublk::sys::UBLK_F_USER_COPY) != 0 {
            ctrl_flags |= u64::from(libublk::sys::UBLK_F_USER_COPY);
        }
        let id_file = id_file(state_dir, volume.name());
        let recover = quiesced_device(&id_file);
        let rt =
            tokio::runtime::Handle::try_current().map_err(|e| UblkError::Lib(e.to_string()))?;
        let (id_tx, id_rx) = mpsc::channel();
        let size = volume.size_bytes();
        let new_id_file = id_file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-{}", volume.name()))
            .spawn(move || {
                let builder = || {
                    UblkCtrlBuilder::default()
                        .name("blkrep")
                        .nr_queues(opts.queues)
                        .depth(opts.depth)
                        .io_buf_bytes(IO_BUF_BYTES)
                        .ctrl_flags(ctrl_flags)
                };
                let built = match recover {
                    Some(id) => builder()
                        .id(id)
                        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                        .build(),
                    None => add_device(&new_id_file, |id| {
                        builder()
                            .id(id)
                            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                            .build()
                    }),
                };
                let ctrl = match built {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = id_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if recover.is_some()
                    && let Err(e) = ctrl.start_user_recover()
                {
                    let _ = id_tx.send(Err(format!("start user recovery: {e}")));
                    return;
                }
                let tgt_init = move |dev: &mut UblkDev| {
                    set_params(dev, size);
                    Ok(())
                };
                let v = volume.clone();
                let q_fn =
                    move |qid: u16, dev: &UblkDev| queue_main(qid, dev, v.clone(), rt.clone());
                let tx = id_tx.clone();
                let started = move |c: &UblkCtrl| {
                    let _ = tx.send(Ok(c.dev_info().dev_id as i32));
                };
                if let Err(e) = ctrl.run_target(tgt_init, q_fn, started) {
                    let _ = id_tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| UblkError::Lib(e.to_string()))?;
        let timeout = Duration::from_secs(20);
        match id_rx.recv_timeout(timeout) {
            Ok(Ok(dev_id)) => {
                if let Some(dir) = id_file.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = std::fs::write(&id_file, format!("{dev_id}\n"));
                tracing::info!(
                    "/dev/ublkb{dev_id} up: {} queue(s) x {} requests, {}{}",
                    opts.queues,
                    opts.depth,
                    if ctrl_flags & u64::from(libublk::sys::UBLK_F_USER_COPY) != 0 {
                        "user copy"
                    } else {
                        "plain copy"
                    },
                    if ctrl_flags & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) != 0 {
                        ", user recovery"
                    } else {
                        ""
                    }
                );
                if recover.is_some() {
                    tracing::info!("recovered /dev/ublkb{dev_id}: waiting I/O resumes");
                }
                Ok(UblkExport {
                    dev_id,
                    recovered: recover.is_some(),
                    id_file,
                    thread: Some(thread),
                })
            }
            Ok(Err(e)) => Err(UblkError::Lib(e)),
            Err(_) => Err(UblkError::Timeout(timeout)),
        }
    }

    /// The block device path.
    pub fn device_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Removes the device and waits for its queue threads.
    pub fn stop(&mut self) {
        if let Ok(c) = UblkCtrl::new_simple(self.dev_id) {
            let _ = c.kill_dev();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            // A recovered device is not owned by its control: delete it.
            if self.recovered
                && let Ok(c) = UblkCtrl::new_simple(self.dev_id)
            {
                let _ = c.del_dev();
            }
            let _ = std::fs::remove_file(&self.id_file);
        }
    }
}

impl Drop for UblkExport {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_params(dev: &mut UblkDev, size: u64) {
    use libublk::sys;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let tgt = &mut dev.tgt;
    tgt.dev_size = size;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 12,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: max_sectors,
            max_write_zeroes_sectors: max_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Wakes a queue thread from another thread.
struct Notifier {
    fd: OwnedFd,
}

impl Notifier {
    fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier { fd })
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

fn queue_main(qid: u16, dev: &UblkDev, volume: VolumeHandle, rt: tokio::runtime::Handle) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    let notifier = match Notifier::new() {
        Ok(n) => Arc::new(n),
        Err(e) => {
            tracing::error!("ublk queue {qid}: eventfd: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    // Keep a read armed on the eventfd in this queue's ring.
    let wake_fd = notifier.fd.as_raw_fd();
    let wake_q = q.clone();
    exe.spawn(async move {
        let mut buf = [0u8; 8];
        while !wake_q.is_stopping() {
            let sqe =
                io_uring::opcode::Read::new(io_uring::types::Fd(wake_fd), buf.as_mut_ptr(), 8)
                    .build();
            if ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                .await
                .is_err()
            {
                break;
            }
        }
    })
    .detach();
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let v = volume.clone();
        let rt = rt.clone();
        let n = notifier.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, v, rt, n).await {
                Ok(()) | Err(libublk::UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("ublk io task {tag}: {e}"),
            }
        }));
    }
    let e = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while e.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(err) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::debug!("ublk queue {qid} stopped: {err}");
        }
    }));
}

/// Runs `fut` on the tokio runtime and wakes this queue thread when done.
async fn on_tokio<T, F>(rt: &tokio::runtime::Handle, n: &Arc<Notifier>, fut: F) -> Option<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let n = n.clone();
    rt.spawn(async move {
        let r = fut.await;
        let _ = tx.send(r);
        n.wake();
    });
    rx.await.ok()
}

fn errno(e: &VolumeError) -> i32 {
    match e {
        VolumeError::OutOfRange { .. } => -libc::EINVAL,
        VolumeError::Io(crate::engine::IoFailure::NotPrimary) => -libc::EPERM,
        _ => -libc::EIO,
    }
}

/// How request data moves between the kernel and this process.
enum DataPath {
    /// Plain copy mode: the kernel copies data into/out of a per-tag buffer.
    Copy(IoBuf<u8>),
    /// UBLK_F_USER_COPY: this process reads/writes the request's pages
    /// through the char device (fixed file 0 of the queue ring), straight
    /// into and out of its own aligned buffers; no per-tag buffer.
    UserCopy,
}

impl DataPath {
    fn slice(&self) -> &[u8] {
        match self {
            DataPath::Copy(b) => b.as_slice(),
            DataPath::UserCopy => &[],
        }
    }

    /// The data of a WRITE request.
    async fn fetch(&self, q: &UblkQueue<'_>, tag: u16, len: usize) -> Result<AlignedBuf, i32> {
        match self {
            DataPath::Copy(b) => Ok(AlignedBuf::copy_from(&b.as_slice()[..len])),
            DataPath::UserCopy => {
                let mut data = AlignedBuf::zeroed(len);
                let pos = libublk::io::UblkIOCtx::ublk_user_copy_pos(q.get_qid(), tag, 0);
                let sqe = io_uring::opcode::Read::new(
                    io_uring::types::Fixed(0),
                    data.as_mut_ptr(),
                    len as u32,
                )
                .offset(pos)
                .build();
                match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
                    Ok(n) if n as usize == len => Ok(data),
                    _ => Err(-libc::EIO),
                }
            }
        }
    }

    /// Hands the data of a READ request to the kernel; returns the result.
    async fn deliver(&mut self, q: &UblkQueue<'_>, tag: u16, data: &AlignedBuf) -> i32 {
        let len = data.len();
        match self {
            DataPath::Copy(b) => {
                b.as_mut_slice()[..len].copy_from_slice(data.as_slice());
                len as i32
            }
            DataPath::UserCopy => {
                let pos = libublk::io::UblkIOCtx::ublk_user_copy_pos(q.get_qid(), tag, 0);
                let sqe = io_uring::opcode::Write::new(
                    io_uring::types::Fixed(0),
                    data.as_ptr(),
                    len as u32,
                )
                .offset(pos)
                .build();
                match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
                    Ok(n) if n as usize == len => len as i32,
                    _ => -libc::EIO,
                }
            }
        }
    }
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    volume: VolumeHandle,
    rt: tokio::runtime::Handle,
    n: Arc<Notifier>,
) -> Result<(), libublk::UblkError> {
    use libublk::sys;
    let max_len = q.dev.dev_info.max_io_buf_bytes as usize;
    let user_copy = q.dev.dev_info.flags & u64::from(sys::UBLK_F_USER_COPY) != 0;
    let mut path = if user_copy {
        q.submit_io_prep_cmd(tag, BufDesc::Slice(&[]), 0, None)
            .await?;
        DataPath::UserCopy
    } else {
        let buf = IoBuf::<u8>::new(max_len);
        q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
            .await?;
        DataPath::Copy(buf)
    };
    loop {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let offset = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        let v = volume.clone();
        let res: i32 = if len > max_len {
            -libc::EINVAL
        } else {
            match op {
                sys::UBLK_IO_OP_READ => {
                    match on_tokio(&rt, &n, async move { v.read(offset, len).await }).await {
                        Some(Ok(data)) => path.deliver(q, tag, &data).await,
                        Some(Err(e)) => errno(&e),
                        None => -libc::EIO,
                    }
                }
                sys::UBLK_IO_OP_WRITE => match path.fetch(q, tag, len).await {
                    Ok(data) => {
                        match on_tokio(&rt, &n, async move { v.write(offset, data, fua).await })
                            .await
                        {
                            Some(Ok(())) => len as i32,
                            Some(Err(e)) => errno(&e),
                            None => -libc::EIO,
                        }
                    }
                    Err(e) => e,
                },
                sys::UBLK_IO_OP_FLUSH => {
                    match on_tokio(&rt, &n, async move { v.flush().await }).await {
                        Some(Ok(())) => 0,
                        Some(Err(e)) => errno(&e),
                        None => -libc::EIO,
                    }
                }
                sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                    match on_tokio(&rt, &n, async move {
                        v.write_zeroes(offset, len as u64, fua).await
                    })
                    .await
                    {
                        Some(Ok(())) => 0,
                        Some(Err(e)) => errno(&e),
                        None => -libc::EIO,
                    }
                }
                _ => -libc::EINVAL,
            }
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(path.slice()), res)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id is recorded before the device is added and the device is
    /// added with exactly that id; when the kernel says it is taken, the
    /// next one is tried and recorded. (No ublk devices exist on the test
    /// machine, so every id is free by sysfs.)
    #[test]
    fn a_device_is_added_with_the_id_its_file_records() {
        let dir = crate::testkit::cluster::scratch_dir("ublk-id");
        let file = id_file(&dir, "vol0");
        let taken = [0, 1];
        let asked = std::cell::RefCell::new(Vec::new());
        let got = add_device(&file, |id| {
            let recorded: i32 = std::fs::read_to_string(&file)
                .expect("recorded before the add")
                .trim()
                .parse()
                .expect("an id");
            assert_eq!(recorded, id, "the file names the id being added");
            asked.borrow_mut().push(id);
            if taken.contains(&id) {
                Err(libublk::UblkError::UringIOError(-libc::EEXIST))
            } else {
                Ok(id)
            }
        })
        .expect("a free id");
        assert_eq!(got, 2);
        assert_eq!(*asked.borrow(), vec![0, 1, 2]);
        assert_eq!(std::fs::read_to_string(&file).expect("id file"), "2\n");
        // Any other failure leaves no file naming a device that is not there.
        let e = add_device::<i32>(&file, |_| Err(libublk::UblkError::OtherError(-libc::EPERM)));
        assert!(e.is_err());
        assert!(!file.exists());
    }
}

//! NBD export of a volume over a Unix socket: fixed newstyle handshake
//! (EXPORT_NAME, INFO, GO, LIST, ABORT), simple replies, and READ, WRITE
//! (with FUA), FLUSH, TRIM and WRITE_ZEROES. Requests are served
//! concurrently (bounded per connection); replies go out as they complete.
//!
//! Block size constraints are advertised as 4 KiB minimum/preferred and
//! 1 MiB maximum. Misaligned reads are served; misaligned writes get EINVAL
//! (clients that negotiate block sizes, such as qemu and libnbd, never send
//! them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::engine::IoFailure;
use crate::store::AlignedBuf;
use crate::volume::{VolumeError, VolumeHandle};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FLAG_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ESHUTDOWN: u32 = 108;

/// Longest option payload accepted during the handshake.
const OPTION_MAX_BYTES: u32 = 4096;
/// Largest single request accepted (the NBD default maximum).
pub const REQUEST_MAX_BYTES: u32 = 32 << 20;
/// Largest piece handed to the volume at once.
const PIECE_MAX_BYTES: usize = 1 << 20;
/// Requests in flight per NBD connection.
const CONNECTION_INFLIGHT_MAX: usize = 128;
/// Client connections one export serves at once (qemu-nbd serves one by
/// default, `--shared`; nbdcopy opens 4, fio one per job, `blkrep bench`'s
/// own load generator one per request in flight, up to 32); one more is
/// closed at once, with a warning. Each costs a 256 KiB read buffer.
pub const CONNECTIONS_MAX: usize = 64;
/// How long a client may take from connecting to the end of its handshake
/// (qemu-nbd's `--handshake-limit` default).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Options one handshake may send (nbdkit's limit).
pub const OPTIONS_MAX: usize = 32;
const _: () = assert!(
    REQUEST_MAX_BYTES as usize + 2 * BLOCK as usize <= crate::volume::CLIENT_INFLIGHT_BYTES_MAX
);

/// Warnings about refused clients and failed accepts.
static REFUSED_LOG: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));
const BLOCK: u64 = 4096;

/// Why an NBD session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O.
    #[error("NBD socket: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
}

/// A running NBD export; stops when dropped or on `stop`.
pub struct NbdServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    /// Client connections open now (counted from accept to close).
    clients: Arc<AtomicUsize>,
}

impl NbdServer {
    /// Listens on `path` (replacing a stale socket file) and serves `volume`
    /// to the processes `access` allows (the socket is 0600, or 0660 owned
    /// by the configured group, and each client's credentials are checked).
    pub fn start(
        volume: VolumeHandle,
        path: &Path,
        access: crate::access::Access,
    ) -> std::io::Result<Self> {
        let listener = crate::access::bind_replacing(path, access.group)?;
        let (stop, stop_rx) = watch::channel(false);
        let clients = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(
            listener,
            volume,
            access,
            stop_rx,
            clients.clone(),
        ));
        Ok(NbdServer {
            path: path.to_path_buf(),
            stop,
            clients,
        })
    }

    /// How many clients are connected now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops listening and closes every client connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: UnixListener,
    volume: VolumeHandle,
    access: crate::access::Access,
    mut stop: watch::Receiver<bool>,
    clients: Arc<AtomicUsize>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) if !access.allows_peer(&stream) => {
                    let cred = stream.peer_cred().ok();
                    REFUSED_LOG.warn(|| format!(
                        "volume {}: refused an NBD client (uid {:?}): only root, the daemon's user and control_group may use the export",
                        volume.name(),
                        cred.map(|c| c.uid())
                    ));
                }
                Ok(_) if clients.load(Ordering::Acquire) >= CONNECTIONS_MAX => {
                    // (Dropping the stream closes it: the client sees the
                    // connection end before the greeting.)
                    REFUSED_LOG.warn(|| format!(
                        "volume {}: refused an NBD client: {CONNECTIONS_MAX} connections are open, the most one export serves",
                        volume.name()
                    ));
                }
                Ok((stream, _)) => {
                    let v = volume.clone();
                    let mut s = stop.clone();
                    let open = ClientCount::enter(clients.clone());
                    tokio::spawn(async move {
                        let _open = open;
                        tokio::select! {
                            _ = s.changed() => {}
                            r = serve_connection(stream, v) => {
                                if let Err(e) = r {
                                    tracing::warn!("NBD client session ended: {e}");
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    // (Out of descriptors, say: back off instead of spinning.)
                    REFUSED_LOG.warn(|| format!("volume {}: NBD accept failed: {e}", volume.name()));
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One open client connection in the export's count, until dropped.
struct ClientCount(Arc<AtomicUsize>);

impl ClientCount {
    fn enter(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        ClientCount(count)
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
}

async fn option_reply<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

/// Runs the handshake; returns the client flags when transmission starts,
/// None when the client ended the session.
async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    volume: &VolumeHandle,
) -> Result<Option<u32>, NbdError>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut g = Vec::with_capacity(18);
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&g).await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !3 != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let size = volume.size_bytes();
    for _ in 0..OPTIONS_MAX {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > OPTION_MAX_BYTES {
            return Err(NbdError::Protocol(format!(
                "option {opt} payload of {len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if !name_matches(&data, volume.name()) {
                    return Err(NbdError::Protocol("unknown export name".into()));
                }
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&transmission_flags().to_be_bytes());
                if client_flags & CLIENT_FLAG_NO_ZEROES == 0 {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                return Ok(Some(client_flags));
            }
            OPT_ABORT => {
                option_reply(w, opt, REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let name = volume.name().as_bytes();
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                option_reply(w, opt, REP_SERVER, &d).await?;
                option_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                if !name_matches(name, volume.name()) {
                    option_reply(w, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(w, opt, REP_INFO, &export).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                bs.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                bs.extend_from_slice(&(PIECE_MAX_BYTES as u32).to_be_bytes());
                option_reply(w, opt, REP_INFO, &bs).await?;
                option_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(client_flags));
                }
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, &[]).await?,
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {OPTIONS_MAX} options in one handshake"
    )))
}

fn name_matches(name: &[u8], volume: &str) -> bool {
    name.is_empty() || name == volume.as_bytes()
}

/// Parses the payload of NBD_OPT_INFO/GO; returns the export name.
fn parse_info_request(d: &[u8]) -> Option<&[u8]> {
    let name_len = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4 + name_len)?;
    let rest = d.get(4 + name_len..)?;
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    (rest.len() == 2 + 2 * n).then_some(name)
}

/// One parsed transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub cmd: u16,
    /// Client cookie.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// Parses a 28-byte request header.
pub fn parse_request(b: &[u8; 28]) -> Result<Request, NbdError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
    }
    let mut h = [0u8; 8];
    h.copy_from_slice(&b[8..16]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[16..24]);
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        cmd: u16::from_be_bytes([b[6], b[7]]),
        handle: u64::from_be_bytes(h),
        offset: u64::from_be_bytes(o),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

struct ReplyMsg {
    handle: u64,
    error: u32,
    /// Read data: the buffer, where the reply's bytes start in it, how
    /// many, and the volume's client-bytes budget it holds until sent.
    data: Option<(AlignedBuf, usize, usize, OwnedSemaphorePermit)>,
}

async fn reply_writer(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<ReplyMsg>) {
    while let Some(m) = rx.recv().await {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        hdr[4..8].copy_from_slice(&m.error.to_be_bytes());
        hdr[8..16].copy_from_slice(&m.handle.to_be_bytes());
        if w.write_all(&hdr).await.is_err() {
            return;
        }
        if let Some((buf, start, len, _budget)) = &m.data
            && w.write_all(&buf.as_slice()[*start..*start + *len])
                .await
                .is_err()
        {
            return;
        }
    }
}

fn errno_of(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io(IoFailure::NotPrimary) => EPERM,
        VolumeError::OutOfRange { .. } => EINVAL,
        VolumeError::Detached => ESHUTDOWN,
        VolumeError::Store(crate::store::StoreError::Io { source, .. })
            if source.raw_os_error() == Some(libc::ENOSPC) =>
        {
            ENOSPC
        }
        _ => EIO,
    }
}

/// Serves one client connection from its handshake to its end (the accept
/// loop's access check and connection bound come before this): for the
/// export, and for driving the real server from tests and fuzz targets.
pub async fn serve_connection(
    stream: tokio::net::UnixStream,
    volume: VolumeHandle,
) -> Result<(), NbdError> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(256 * 1024, r);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut r, &mut w, &volume)).await {
        Err(_) => {
            return Err(NbdError::Protocol(format!(
                "no complete handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )));
        }
        Ok(r) => {
            if r?.is_none() {
                return Ok(());
            }
        }
    }
    let (tx, rx) = mpsc::channel(CONNECTION_INFLIGHT_MAX);
    let writer = tokio::spawn(reply_writer(w, rx));
    let permits = Arc::new(Semaphore::new(CONNECTION_INFLIGHT_MAX));
    let result = transmission(&mut r, &volume, &tx, &permits).await;
    // Let in-flight requests finish and their replies go out.
    let _ = permits.acquire_many(CONNECTION_INFLIGHT_MAX as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

async fn transmission<R: AsyncReadExt + Unpin>(
    r: &mut R,
    volume: &VolumeHandle,
    tx: &mpsc::Sender<ReplyMsg>,
    permits: &Arc<Semaphore>,
) -> Result<(), NbdError> {
    let size = volume.size_bytes();
    loop {
        let mut hb = [0u8; 28];
        match r.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = parse_request(&hb)?;
        let in_bounds = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= size);
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| NbdError::Protocol("shutting down".into()))?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let aligned = req.offset % BLOCK == 0 && u64::from(req.length) % BLOCK == 0;
        let (handle, offset, length) = (req.handle, req.offset, req.length);
        match req.cmd {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if length > REQUEST_MAX_BYTES {
                    return Err(NbdError::Protocol(format!(
                        "write of {length} bytes is too large"
                    )));
                }
                // (The budget is taken before the buffer exists.)
                let budget = volume.reserve_client_bytes(length).await.map_err(shut)?;
                let mut buf = AlignedBuf::zeroed(length as usize);
                r.read_exact(buf.as_mut_slice()).await?;
                if !in_bounds || !aligned {
                    reply_error(tx, handle, EINVAL).await;
                    continue;
                }
                let v = volume.clone();
                reply_when_done(tx, handle, permit, async move {
                    let done = write_pieces(&v, offset, buf, fua).await;
                    drop(budget);
                    done
                });
            }
            CMD_READ => {
                if !in_bounds || length > REQUEST_MAX_BYTES {
                    reply_error(tx, handle, EINVAL).await;
                    continue;
                }
                let (start, end) = span(offset, length as usize);
                let budget = volume
                    .reserve_client_bytes((end - start) as u32)
                    .await
                    .map_err(shut)?;
                let v = volume.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let msg = match read_span(&v, offset, length as usize).await {
                        Ok((buf, start)) => ReplyMsg {
                            handle,
                            error: 0,
                            data: Some((buf, start, length as usize, budget)),
                        },
                        Err(e) => ReplyMsg {
                            handle,
                            error: errno_of(&e),
                            data: None,
                        },
                    };
                    let _ = tx.send(msg).await;
                    drop(permit);
                });
            }
            CMD_FLUSH => {
                let v = volume.clone();
                reply_when_done(tx, handle, permit, async move { v.flush().await });
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_bounds || !aligned {
                    reply_error(tx, handle, EINVAL).await;
                    continue;
                }
                let v = volume.clone();
                // TRIM is replicated as zeroing, so both copies stay equal.
                reply_when_done(tx, handle, permit, async move {
                    v.write_zeroes(offset, u64::from(length), fua).await
                });
            }
            _ => reply_error(tx, handle, EINVAL).await,
        }
    }
}

/// The session ends when the volume's budget is gone (it was detached).
fn shut(e: VolumeError) -> NbdError {
    NbdError::Protocol(format!("volume unavailable: {e}"))
}

/// `[offset, offset+len)` widened to 4 KiB alignment.
fn span(offset: u64, len: usize) -> (u64, u64) {
    let start = offset / BLOCK * BLOCK;
    let end = (offset + len as u64).div_ceil(BLOCK) * BLOCK;
    (start, end)
}

/// Replies with an error right away (in order with other replies).
async fn reply_error(tx: &mpsc::Sender<ReplyMsg>, handle: u64, error: u32) {
    let _ = tx
        .send(ReplyMsg {
            handle,
            error,
            data: None,
        })
        .await;
}

/// Runs a request without reply data in its own task and replies when done;
/// the permit bounds the requests in flight on this connection.
fn reply_when_done<F>(tx: &mpsc::Sender<ReplyMsg>, handle: u64, permit: OwnedSemaphorePermit, op: F)
where
    F: std::future::Future<Output = Result<(), VolumeError>> + Send + 'static,
{
    let tx = tx.clone();
    tokio::spawn(async move {
        let error = op.await.err().map_or(0, |e| errno_of(&e));
        let _ = tx
            .send(ReplyMsg {
                handle,
                error,
                data: None,
            })
            .await;
        drop(permit);
    });
}

/// Writes a large buffer in pieces the volume accepts.
async fn write_pieces(
    v: &VolumeHandle,
    offset: u64,
    buf: AlignedBuf,
    fua: bool,
) -> Result<(), VolumeError> {
    if buf.len() <= PIECE_MAX_BYTES {
        return v.write(offset, buf, fua).await;
    }
    let mut at = 0;
    while at < buf.len() {
        let n = PIECE_MAX_BYTES.min(buf.len() - at);
        let piece = AlignedBuf::copy_from(&buf.as_slice()[at..at + n]);
        v.write(offset + at as u64, piece, fua).await?;
        at += n;
    }
    Ok(())
}

/// Reads `[offset, offset+len)`, widening to 4 KiB alignment; returns the
/// buffer and where the requested bytes start in it.
async fn read_span(
    v: &VolumeHandle,
    offset: u64,
    len: usize,
) -> Result<(AlignedBuf, usize), VolumeError> {
    let (start, end) = span(offset, len);
    let total = (end - start) as usize;
    if total == 0 {
        return Ok((AlignedBuf::zeroed(0), 0));
    }
    if total <= PIECE_MAX_BYTES {
        return Ok((v.read(start, total).await?, (offset - start) as usize));
    }
    let mut out = AlignedBuf::zeroed(total);
    let mut at = 0;
    while at < total {
        let n = PIECE_MAX_BYTES.min(total - at);
        let piece = v.read(start + at as u64, n).await?;
        out.as_mut_slice()[at..at + n].copy_from_slice(piece.as_slice());
        at += n;
    }
    Ok((out, (offset - start) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing() {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&8192u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            (r.flags, r.cmd, r.handle, r.offset, r.length),
            (1, 1, 7, 4096, 8192)
        );
        b[0] ^= 1;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn info_request_parsing() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some(&b"vol"[..]));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut bad = 1000u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"x");
        assert_eq!(parse_info_request(&bad), None);
    }
}

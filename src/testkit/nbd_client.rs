//! A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies) used by
//! `blkrep demo` to drive a volume and record exactly which writes were
//! acknowledged. Requests are sent one at a time.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// NBD client errors.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// Socket I/O.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server answered a request with an error.
    #[error("NBD server returned error {0}")]
    Errno(u32),
}

/// A connected client.
pub struct NbdClient {
    stream: UnixStream,
    size_bytes: u64,
    next_handle: u64,
}

impl NbdClient {
    /// Connects to the export on `socket` and negotiates with NBD_OPT_GO.
    pub async fn connect(socket: &Path) -> Result<Self, NbdClientError> {
        let mut s = UnixStream::connect(socket).await?;
        let magic = s.read_u64().await?;
        let opt_magic = s.read_u64().await?;
        if magic != 0x4e42_444d_4147_4943 || opt_magic != 0x4948_4156_454f_5054 {
            return Err(NbdClientError::Protocol("not a newstyle NBD server".into()));
        }
        let _flags = s.read_u16().await?;
        s.write_u32(3).await?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut go = Vec::new();
        go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&8u32.to_be_bytes()); // name len (4) + nr infos (2) + 1 info (2)
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        s.write_all(&go).await?;
        let mut size_bytes = None;
        loop {
            let _magic = s.read_u64().await?;
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await?;
            if len > 4096 {
                return Err(NbdClientError::Protocol("oversized option reply".into()));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            match kind {
                1 => break,
                3 if data.len() >= 12 && data[0..2] == [0, 0] => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size_bytes = Some(u64::from_be_bytes(b));
                }
                3 => {}
                k if k & (1 << 31) != 0 => {
                    return Err(NbdClientError::Protocol(format!(
                        "server refused GO: {k:#x}"
                    )));
                }
                _ => {}
            }
        }
        let size_bytes =
            size_bytes.ok_or_else(|| NbdClientError::Protocol("no export size".into()))?;
        Ok(NbdClient {
            stream: s,
            size_bytes,
            next_handle: 1,
        })
    }

    /// Export size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    async fn command(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, NbdClientError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.stream.write_all(&req).await?;
        Ok(handle)
    }

    async fn reply(&mut self, handle: u64) -> Result<(), NbdClientError> {
        let magic = self.stream.read_u32().await?;
        let error = self.stream.read_u32().await?;
        let h = self.stream.read_u64().await?;
        if magic != 0x6744_6698 || h != handle {
            return Err(NbdClientError::Protocol("unexpected reply".into()));
        }
        if error != 0 {
            return Err(NbdClientError::Errno(error));
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), NbdClientError> {
        let h = self
            .command(1, u16::from(fua), offset, data.len() as u32, data)
            .await?;
        self.reply(h).await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        let h = self.command(0, 0, offset, len, &[]).await?;
        self.reply(h).await?;
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<(), NbdClientError> {
        let h = self.command(3, 0, 0, 0, &[]).await?;
        self.reply(h).await
    }

    /// Disconnects politely.
    pub async fn disconnect(mut self) -> Result<(), NbdClientError> {
        self.command(2, 0, 0, 0, &[]).await?;
        Ok(())
    }
}

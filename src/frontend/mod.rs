//! How applications reach a volume. Every frontend translates its requests
//! into `read / write / flush / write_zeroes` calls on a
//! [`VolumeHandle`](crate::volume::VolumeHandle) and nothing else; the
//! engine decides where data goes.
//!
//! - [`ublk`]: `/dev/ublkbN` through the kernel's ublk driver (Linux 6.0+):
//!   the production path.
//! - [`nbd`]: NBD over a Unix socket, for kernels without ublk, QEMU guests,
//!   and third-party clients (qemu-io, qemu-img, nbdcopy, fio).

pub mod nbd;
pub mod ublk;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::volume::VolumeHandle;

/// Which frontend exports a volume on its primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// ublk when the kernel has it, NBD otherwise.
    #[default]
    Auto,
    /// Always NBD.
    Nbd,
    /// Always ublk; attaching fails when the kernel has no ublk driver.
    Ublk,
}

/// A running export of one volume.
pub enum Export {
    /// An NBD server on a Unix socket.
    Nbd(nbd::NbdServer),
    /// A ublk block device.
    Ublk(ublk::UblkExport),
}

/// Why an export could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// NBD socket problem.
    #[error("NBD export: {0}")]
    Nbd(#[from] std::io::Error),
    /// ublk problem.
    #[error(transparent)]
    Ublk(#[from] ublk::UblkError),
}

impl Export {
    /// Starts the frontend for `volume`. Blocks until a ublk device is up.
    pub fn start(
        volume: VolumeHandle,
        kind: ExportKind,
        run_dir: &Path,
        ublk_opts: ublk::UblkOptions,
        access: crate::access::Access,
    ) -> Result<Self, ExportError> {
        let use_ublk = match kind {
            ExportKind::Nbd => false,
            ExportKind::Ublk => true,
            ExportKind::Auto => ublk::driver_features().is_ok(),
        };
        if use_ublk {
            return Ok(Export::Ublk(ublk::UblkExport::start(
                volume, ublk_opts, run_dir,
            )?));
        }
        let path = nbd_socket_path(run_dir, volume.name());
        Ok(Export::Nbd(nbd::NbdServer::start(volume, &path, access)?))
    }

    /// Where clients connect (for `status`): an NBD URI or a device path.
    pub fn endpoint(&self) -> String {
        match self {
            Export::Nbd(s) => format!("nbd+unix:///?socket={}", s.path().display()),
            Export::Ublk(u) => u.device_path(),
        }
    }

    /// Who uses the export now, in words (None: nobody). NBD: connected
    /// clients. ublk: the device is mounted or held open exclusively (a
    /// probe with O_EXCL; plain opens without O_EXCL are not visible to it).
    pub fn users(&self) -> Option<String> {
        match self {
            Export::Nbd(s) => match s.clients() {
                0 => None,
                1 => Some("1 NBD client is connected".into()),
                n => Some(format!("{n} NBD clients are connected")),
            },
            Export::Ublk(u) => {
                let path = u.device_path();
                let probe = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_EXCL)
                    .open(&path);
                match probe {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some(format!(
                        "{path} is in use (mounted, or held open exclusively)"
                    )),
                    _ => None,
                }
            }
        }
    }

    /// Stops the export and disconnects its clients (blocks for ublk).
    pub fn stop(&mut self) {
        match self {
            Export::Nbd(s) => s.stop(),
            Export::Ublk(u) => u.stop(),
        }
    }
}

/// The NBD socket of `volume` under `run_dir`.
pub fn nbd_socket_path(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(format!("{volume}.nbd"))
}

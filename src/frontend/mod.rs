//! How applications reach a volume. Every frontend translates its requests
//! into `read / write / flush / write_zeroes` calls on a
//! [`VolumeHandle`](crate::volume::VolumeHandle) and nothing else; the
//! engine decides where data goes.
//!
//! - [`nbd`]: NBD over a Unix socket, for QEMU guests, kernels without ublk,
//!   and third-party clients (qemu-io, qemu-img, nbdcopy, fio).
//! - ublk (`/dev/ublkbN`) is the production path on Linux 6.0+; it plugs in
//!   behind the same seam.

pub mod nbd;

use std::path::{Path, PathBuf};

use crate::volume::VolumeHandle;

/// A running export of one volume.
pub enum Export {
    /// An NBD server on a Unix socket.
    Nbd(nbd::NbdServer),
}

impl Export {
    /// Starts the configured frontend for `volume` under `run_dir`.
    pub fn start(volume: VolumeHandle, run_dir: &Path) -> std::io::Result<Self> {
        let path = nbd_socket_path(run_dir, volume.name());
        Ok(Export::Nbd(nbd::NbdServer::start(volume, &path)?))
    }

    /// Where clients connect (for `status`).
    pub fn endpoint(&self) -> String {
        match self {
            Export::Nbd(s) => format!("nbd+unix:///?socket={}", s.path().display()),
        }
    }

    /// Stops the export and disconnects its clients.
    pub fn stop(&self) {
        match self {
            Export::Nbd(s) => s.stop(),
        }
    }
}

/// The NBD socket of `volume` under `run_dir`.
pub fn nbd_socket_path(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(format!("{volume}.nbd"))
}

//! The certificates a daemon (or the witness) loaded, checked at start and
//! twice a day: a warning within 30 days of an end, an error after it.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::validity::{self, CertificateKind, Expiry, Validity};

/// How often the loaded certificates are checked again.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// The CA and own certificate a process loaded (`[tls] ca` and `cert`).
/// One that cannot be read is left out with a warning: rustls accepted it,
/// so the link works; only its date is unknown.
pub fn loaded(ca: &Path, cert: &Path) -> Vec<(CertificateKind, Validity)> {
    let mut out = Vec::new();
    for (kind, path) in [(CertificateKind::Own, cert), (CertificateKind::Ca, ca)] {
        match Validity::of_pem_file(path) {
            Ok(v) => out.push((kind, v)),
            Err(e) => tracing::warn!("cannot read when a certificate expires: {e}"),
        }
    }
    out
}

/// Logs each certificate that expires within 30 days (warning) or expired
/// (error), now and every [`CHECK_INTERVAL`], for as long as the process
/// runs.
pub async fn watch(certificates: Vec<(CertificateKind, Validity)>) {
    loop {
        let now = validity::now_unix_s();
        for (kind, v) in &certificates {
            if let Some(w) = validity::warning(*kind, v, now) {
                match v.expiry(now) {
                    Expiry::Expired { .. } => tracing::error!("{w}"),
                    _ => tracing::warn!("{w}"),
                }
            }
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

/// Records the certificate a peer or the witness presented on a new
/// connection in `seen`, and warns once per certificate (not once per
/// connection) when it expires within 30 days. A certificate the parser
/// could not read (`None`) leaves `seen` as it was.
pub fn note_presented(
    kind: CertificateKind,
    seen: &Mutex<Option<Validity>>,
    presented: Option<Validity>,
) {
    let (Some(validity), Ok(mut seen)) = (presented, seen.lock()) else {
        return;
    };
    if seen.as_ref() != Some(&validity)
        && let Some(w) = validity::warning(kind, &validity, validity::now_unix_s())
    {
        tracing::warn!("{w}");
    }
    *seen = Some(validity);
}

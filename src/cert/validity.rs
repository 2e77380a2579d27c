//! When certificates expire: read from the PEM files a node loads and from
//! the certificates its peers present, so that `status` and the logs say
//! weeks ahead which certificate to renew, instead of the link failing on
//! the day one expires.

use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A certificate is reported as expiring this many days ahead.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

const SECONDS_PER_DAY: i64 = 86_400;

/// A certificate cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ValidityError {
    /// The PEM file cannot be read or holds no certificate.
    #[error("{path}: {message}")]
    File {
        /// File.
        path: String,
        /// Problem.
        message: String,
    },
    /// The DER is not an X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
}

/// Who a certificate names and until when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The subject's common name (a node's name, or the CA's).
    pub subject: String,
    /// The end of its validity (seconds since the Unix epoch).
    pub not_after_unix_s: i64,
}

/// How close a certificate is to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// More than [`EXPIRY_WARNING_DAYS`] left.
    Valid {
        /// Whole days left.
        days_left: i64,
    },
    /// Expires within [`EXPIRY_WARNING_DAYS`]: renew it now.
    Soon {
        /// Whole days left (0: expires today).
        days_left: i64,
    },
    /// Already expired: links that need it are refused.
    Expired {
        /// Whole days since it expired (0: within the last day).
        days_ago: i64,
    },
}

impl Validity {
    /// Reads a DER certificate.
    pub fn of_der(der: &[u8]) -> Result<Self, ValidityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ValidityError::Parse(e.to_string()))?;
        let subject = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| cert.subject().to_string(), str::to_string);
        Ok(Validity {
            subject,
            not_after_unix_s: cert.validity().not_after.timestamp(),
        })
    }

    /// Reads the first certificate of a PEM file (a node's own certificate,
    /// or the CA).
    pub fn of_pem_file(path: &Path) -> Result<Self, ValidityError> {
        let file = |message: String| ValidityError::File {
            path: path.display().to_string(),
            message,
        };
        let first = CertificateDer::pem_file_iter(path)
            .map_err(|e| file(e.to_string()))?
            .next()
            .ok_or_else(|| file("no certificate found".into()))?
            .map_err(|e| file(e.to_string()))?;
        Self::of_der(&first)
    }

    /// How close to its end the certificate is at `now_unix_s`.
    pub fn expiry(&self, now_unix_s: i64) -> Expiry {
        let left_s = self.not_after_unix_s.saturating_sub(now_unix_s);
        if left_s < 0 {
            Expiry::Expired {
                days_ago: left_s.saturating_neg() / SECONDS_PER_DAY,
            }
        } else {
            let days_left = left_s / SECONDS_PER_DAY;
            if days_left < EXPIRY_WARNING_DAYS {
                Expiry::Soon { days_left }
            } else {
                Expiry::Valid { days_left }
            }
        }
    }
}

/// What a certificate is to the node that reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateKind {
    /// This node's own certificate (`[tls] cert`).
    Own,
    /// The cluster CA (`[tls] ca`).
    Ca,
    /// The certificate a replication peer presented.
    Peer,
    /// The certificate the witness presented.
    Witness,
}

impl CertificateKind {
    /// The name `status --json` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateKind::Own => "node",
            CertificateKind::Ca => "ca",
            CertificateKind::Peer => "peer",
            CertificateKind::Witness => "witness",
        }
    }

    /// What to do to replace a certificate of this kind named `subject`.
    pub fn renewal(self, subject: &str) -> String {
        match self {
            CertificateKind::Ca => "create a new cluster CA (`blkrep cert ca --out DIR`) and issue every node's certificate from it".to_string(),
            CertificateKind::Own => format!(
                "issue a new one on the host that holds the CA key (`blkrep cert issue {subject} --ca CA_DIR --out NEW_DIR`), install NEW_DIR/{subject}.pem and .key as this node's [tls] cert and key, and restart its daemon"
            ),
            CertificateKind::Peer | CertificateKind::Witness => format!(
                "issue a new one on the host that holds the CA key (`blkrep cert issue {subject} --ca CA_DIR --out NEW_DIR`), install it as {subject}'s [tls] cert and key, and restart {subject}'s daemon"
            ),
        }
    }
}

/// The warning for a certificate that expires within
/// [`EXPIRY_WARNING_DAYS`] or has expired, with what to do; `None` while
/// it has longer.
pub fn warning(kind: CertificateKind, validity: &Validity, now_unix_s: i64) -> Option<String> {
    let what = match kind {
        CertificateKind::Own => format!("this node's certificate ({})", validity.subject),
        CertificateKind::Ca => "the cluster CA certificate".to_string(),
        CertificateKind::Peer => format!("peer {}'s certificate", validity.subject),
        CertificateKind::Witness => format!("witness {}'s certificate", validity.subject),
    };
    let renew = kind.renewal(&validity.subject);
    match validity.expiry(now_unix_s) {
        Expiry::Valid { .. } => None,
        Expiry::Soon { days_left } => Some(format!(
            "{what} expires {}: links that need it will be refused then; {renew}",
            match days_left {
                0 => "within a day".to_string(),
                n => format!("in {n} days"),
            }
        )),
        Expiry::Expired { days_ago } => Some(format!(
            "{what} expired {}: links that need it are refused; {renew}",
            match days_ago {
                0 => "within the last day".to_string(),
                n => format!("{n} days ago"),
            }
        )),
    }
}

/// Now, in seconds since the Unix epoch.
pub fn now_unix_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_reads_back_its_name_and_end() {
        let dir = std::env::temp_dir().join(format!("blkrep-validity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::cert::create_ca(&dir).expect("ca");
        crate::cert::issue("node-a", &dir, &dir, 10).expect("issue");
        let node = Validity::of_pem_file(&dir.join("node-a.pem")).expect("node cert");
        assert_eq!(node.subject, "node-a");
        let now = now_unix_s();
        // Issued to the end of the day 10 days from today (UTC midnight).
        let left = node.not_after_unix_s - now;
        assert!(
            (9 * SECONDS_PER_DAY..=10 * SECONDS_PER_DAY).contains(&left),
            "{left}"
        );
        assert!(matches!(node.expiry(now), Expiry::Soon { days_left: 9 }));
        let ca = Validity::of_pem_file(&dir.join("ca.pem")).expect("ca cert");
        assert_eq!(ca.subject, "blkrep cluster CA");
        assert!(matches!(ca.expiry(now), Expiry::Valid { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expiry_classes() {
        let v = Validity {
            subject: "x".into(),
            not_after_unix_s: 100 * SECONDS_PER_DAY,
        };
        let at = |day: i64| v.expiry(day * SECONDS_PER_DAY);
        assert_eq!(at(0), Expiry::Valid { days_left: 100 });
        assert_eq!(at(70), Expiry::Valid { days_left: 30 });
        assert_eq!(at(71), Expiry::Soon { days_left: 29 });
        assert_eq!(at(100), Expiry::Soon { days_left: 0 });
        assert_eq!(
            v.expiry(100 * SECONDS_PER_DAY + 1),
            Expiry::Expired { days_ago: 0 }
        );
        assert_eq!(at(103), Expiry::Expired { days_ago: 3 });
        assert_eq!(
            v.expiry(103 * SECONDS_PER_DAY + 5),
            Expiry::Expired { days_ago: 3 }
        );
    }

    #[test]
    fn warnings_name_the_certificate_and_the_renewal() {
        let v = Validity {
            subject: "beta".into(),
            not_after_unix_s: 100 * SECONDS_PER_DAY,
        };
        assert_eq!(warning(CertificateKind::Peer, &v, 0), None);
        let soon = warning(CertificateKind::Peer, &v, 90 * SECONDS_PER_DAY).expect("soon");
        assert!(
            soon.starts_with("peer beta's certificate expires in 10 days"),
            "{soon}"
        );
        assert!(soon.contains("blkrep cert issue beta --ca"), "{soon}");
        let gone = warning(CertificateKind::Own, &v, 102 * SECONDS_PER_DAY).expect("expired");
        assert!(
            gone.contains("this node's certificate (beta) expired 2 days ago"),
            "{gone}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Validity::of_der(b"not a certificate").is_err());
        assert!(Validity::of_der(&[]).is_err());
        assert!(Validity::of_der(&[0x30, 0x82, 0xff, 0xff]).is_err());
    }
}

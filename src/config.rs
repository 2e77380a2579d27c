//! The node configuration file (TOML). One file describes the cluster; the
//! `node` key says which node this file is for, so the rest can be identical
//! on every node.
//!
//! ```toml
//! node = "alpha"
//! control_socket = "/run/blkrep/control.sock"
//! run_dir = "/run/blkrep"
//!
//! [tls]
//! ca = "/etc/blkrep/ca.pem"
//! cert = "/etc/blkrep/alpha.pem"
//! key = "/etc/blkrep/alpha.key"
//!
//! [nodes.alpha]
//! address = "10.0.0.1:7788"
//! [nodes.beta]
//! address = "10.0.0.2:7788"
//!
//! [[volume]]
//! name = "vm-101-disk-0"
//! nodes.alpha = { disk = "/dev/vg0/vm-101", meta = "internal" }
//! nodes.beta = { disk = "/dev/vg0/vm-101", meta = "internal" }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/blkrep/blkrep.toml";

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// TOML syntax or type error (the message names the key and line).
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value is not acceptable.
    #[error("config {path}: key `{key}`: {problem}")]
    Invalid {
        /// File.
        path: String,
        /// Dotted key.
        key: String,
        /// What is wrong and what is expected.
        problem: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name (must match its certificate).
    pub node: String,
    /// Path of the control socket.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Group (name or number) whose members may use the control socket
    /// and the NBD exports besides root (the sockets are then mode 0660 and
    /// owned by that group); unset: root only (mode 0600).
    #[serde(default)]
    pub control_group: Option<String>,
    /// Directory for runtime files (NBD sockets).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// TLS files.
    pub tls: TlsConfig,
    /// Link tunables.
    #[serde(default)]
    pub link: LinkConfig,
    /// Every node of the cluster by name.
    pub nodes: BTreeMap<String, NodeConfig>,
    /// Replicated volumes.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// ublk device layout.
    #[serde(default)]
    pub ublk: UblkConfig,
    /// The witness that arbitrates quorum (absent: two-node mode without
    /// automatic failover safety; see README).
    #[serde(default)]
    pub witness: Option<WitnessRef>,
    /// Commands run on events (quorum-lost, promoted, split-brain, ...).
    #[serde(default)]
    pub handlers: BTreeMap<String, String>,
    /// Test and drill switches.
    #[serde(default)]
    pub debug: DebugConfig,
    /// The file this was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

/// TLS material: the cluster CA and this node's certificate and key (PEM).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Replication link tunables (units last).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// A peer silent for this long is declared dead.
    pub peer_timeout_ms: u64,
    /// Keepalive interval (must be well below `peer_timeout_ms`).
    pub keepalive_interval_ms: u64,
    /// Longest wait between reconnect attempts.
    pub reconnect_backoff_max_ms: u64,
    /// Replicated requests in flight per connection (backpressure beyond).
    pub inflight_requests_max: usize,
    /// Largest UDP payload to probe for (jumbo frames on a dedicated link).
    pub mtu_max_bytes: u16,
    /// Primary lease each node grants its connected peer (rule 7): a primary
    /// cut off from both peer and witness stops serving after this long.
    pub lease_ms: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            peer_timeout_ms: 2000,
            keepalive_interval_ms: 500,
            reconnect_backoff_max_ms: 2000,
            inflight_requests_max: 512,
            mtu_max_bytes: 8952,
            lease_ms: 2000,
        }
    }
}

/// Where the witness is and what to do without quorum.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessRef {
    /// The witness's name (its certificate must name it).
    pub name: String,
    /// Its address (UDP, QUIC).
    pub address: SocketAddr,
    /// What a primary does with I/O while it reaches neither peer nor
    /// witness: "suspend" (wait) or "io-error" (fail with EIO).
    #[serde(default)]
    pub on_no_quorum: crate::quorum::NoQuorumPolicy,
    /// How long to wait for one witness answer.
    #[serde(default = "default_witness_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_witness_timeout_ms() -> u64 {
    1000
}

/// The events a handler can be configured for.
pub const EVENTS: &[&str] = &[
    "quorum-lost",
    "quorum-regained",
    "promoted",
    "demoted",
    "peer-outdated",
    "split-brain",
    "resync-started",
    "resync-done",
    "local-disk-failed",
];

/// The witness service's own configuration (`blkrep witness --config`).
///
/// ```toml
/// node = "witness"                 # the name in its certificate
/// listen = "0.0.0.0:7790"
/// state_dir = "/var/lib/blkrep-witness"
/// nodes = ["alpha", "beta"]       # data nodes it serves
/// lease_ms = 2000
/// [tls]
/// ca = "/etc/blkrep/ca.pem"
/// cert = "/etc/blkrep/witness.pem"
/// key = "/etc/blkrep/witness.key"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's name (must match its certificate).
    pub node: String,
    /// Listen address (UDP, QUIC).
    pub listen: SocketAddr,
    /// Where the records live (one fsynced file per volume).
    pub state_dir: PathBuf,
    /// Data nodes allowed to talk to it.
    pub nodes: Vec<String>,
    /// Primary lease length granted per heartbeat.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// TLS files.
    pub tls: TlsConfig,
    /// The file this was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

fn default_lease_ms() -> u64 {
    2000
}

/// Reads a config file (errors name it).
fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses TOML (errors name the file, key and line).
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

impl WitnessConfig {
    /// Reads and validates a witness config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read_text(path)?, path)
    }

    /// Parses and validates witness config text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: WitnessConfig = parse_toml(text, path)?;
        cfg.path = path.to_path_buf();
        let invalid = |key: &str, problem: &str| ConfigError::Invalid {
            path: path.display().to_string(),
            key: key.into(),
            problem: problem.into(),
        };
        if !valid_node_name(&cfg.node) {
            return Err(invalid("node", "must be a DNS label"));
        }
        if cfg.nodes.is_empty() || !cfg.nodes.iter().all(|n| valid_node_name(n)) {
            return Err(invalid(
                "nodes",
                "list the data nodes' names (DNS labels) this witness serves",
            ));
        }
        if !(200..=600_000).contains(&cfg.lease_ms) {
            return Err(invalid("lease_ms", "must be between 200 and 600000"));
        }
        Ok(cfg)
    }
}

/// ublk device layout (applies to every volume exported through ublk).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UblkConfig {
    /// Hardware queues per device (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Use UBLK_F_USER_COPY when the kernel offers it (one copy less, and no
    /// per-request buffer of 1 MiB per tag); false forces plain copy mode.
    pub user_copy: bool,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            queues: 1,
            depth: 64,
            user_copy: true,
        }
    }
}

/// One node of the cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Replication address (UDP, QUIC).
    pub address: SocketAddr,
}

/// One volume.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Volume name.
    pub name: String,
    /// Bytes per dirty-bitmap bit (power of two, 4 KiB .. 1 MiB).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Resync bandwidth cap; 0 = unlimited.
    #[serde(default)]
    pub resync_rate_max_bytes_per_s: u64,
    /// Resync never slows below this, however busy the application is.
    #[serde(default = "default_resync_rate_min")]
    pub resync_rate_min_bytes_per_s: u64,
    /// Application write latency above which the resync backs off; 0
    /// (default): twice what application writes took without a resync.
    #[serde(default = "default_app_latency_target_ms")]
    pub resync_app_latency_target_ms: u64,
    /// Activity-log extents (4 MiB each) that may be written without a
    /// metadata update; after a crash of the primary only these are resynced.
    #[serde(default = "default_al_extents")]
    pub al_extents: usize,
    /// How the primary exports it: "auto" (ublk if the kernel has it, else
    /// NBD), "ublk" or "nbd".
    #[serde(default)]
    pub export: crate::frontend::ExportKind,
    /// The two nodes holding it.
    pub nodes: BTreeMap<String, VolumeNodeConfig>,
}

/// Where one node keeps one volume.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeNodeConfig {
    /// Backing disk (file, partition, LV, zvol).
    pub disk: PathBuf,
    /// `internal` (at the end of the disk) or the path of a metadata file.
    #[serde(default = "default_meta")]
    pub meta: String,
    /// Whether the disk's write cache may lose completed writes in a power
    /// cut: "auto" (default; volatile unless the kernel reports the block
    /// device "write through"), "volatile", or "power-loss-protected"
    /// (declared non-volatile: blkrep then takes a completed write as
    /// durable and skips the flushes it would otherwise wait for).
    /// Dangerous when wrong: a power cut can then lose acknowledged writes.
    #[serde(default)]
    pub disk_cache: DiskCache,
}

/// What a node's disk cache does in a power cut (see `disk_cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCache {
    /// Volatile unless the kernel reports the device write-through.
    #[default]
    Auto,
    /// May lose completed writes until a flush covers them.
    Volatile,
    /// Keeps every completed write through a power cut (capacitor-backed
    /// drives, battery-backed controllers).
    PowerLossProtected,
}

impl VolumeNodeConfig {
    /// Whether this node's disk may lose completed writes in a power cut.
    pub fn volatile_cache(&self) -> bool {
        match self.disk_cache {
            DiskCache::Volatile => true,
            DiskCache::PowerLossProtected => false,
            DiskCache::Auto => !crate::store::backing::kernel_reports_write_through(&self.disk),
        }
    }

    /// Parsed metadata location.
    pub fn meta_location(&self) -> MetaLocation {
        if self.meta == "internal" {
            MetaLocation::Internal
        } else {
            MetaLocation::External(PathBuf::from(&self.meta))
        }
    }
}

/// Switches for tests and drills.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Allow `blkrep debug fail-disk` to inject local disk faults.
    #[serde(default)]
    pub fault_injection: bool,
    /// Drills only (needs `fault_injection`): give every local data disk a
    /// volatile write cache held in the daemon's memory, which `blkrep
    /// debug power-cut` drops (see `store::faulty`).
    #[serde(default)]
    pub volatile_cache: bool,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/blkrep/control.sock")
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/blkrep")
}
fn default_chunk_bytes() -> u32 {
    crate::meta::DEFAULT_CHUNK_BYTES
}
fn default_resync_rate_min() -> u64 {
    8 << 20
}
fn default_app_latency_target_ms() -> u64 {
    0
}
fn default_al_extents() -> usize {
    crate::meta::activity_log::DEFAULT_AL_EXTENTS
}
fn default_meta() -> String {
    "internal".into()
}

/// Where a volume's metadata lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing disk.
    Internal,
    /// In a separate file.
    External(PathBuf),
}

/// Whether `name` is a valid node name: a DNS label (it is the certificate's
/// subject name).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `name` is a valid volume name.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::meta::superblock::VOLUME_NAME_MAX_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.')
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read_text(path)?, path)
    }

    /// Parses and validates config text (`path` is used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = parse_toml(text, path)?;
        cfg.path = path.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for name in self.nodes.keys() {
            if !valid_node_name(name) {
                return Err(self.invalid(
                    format!("nodes.{name}"),
                    "node names must be lowercase letters, digits and '-' (a DNS label)",
                ));
            }
        }
        if !self.nodes.contains_key(&self.node) {
            return Err(self.invalid(
                "node",
                format!("this node {:?} is not listed under [nodes]", self.node),
            ));
        }
        let l = &self.link;
        if l.peer_timeout_ms < 100 || l.peer_timeout_ms > 600_000 {
            return Err(self.invalid("link.peer_timeout_ms", "must be between 100 and 600000"));
        }
        if l.keepalive_interval_ms == 0 || l.keepalive_interval_ms * 2 > l.peer_timeout_ms {
            return Err(self.invalid(
                "link.keepalive_interval_ms",
                "must be non-zero and at most half of link.peer_timeout_ms",
            ));
        }
        if l.inflight_requests_max == 0 || l.inflight_requests_max > 65536 {
            return Err(self.invalid("link.inflight_requests_max", "must be between 1 and 65536"));
        }
        if l.mtu_max_bytes < 1200 {
            return Err(self.invalid("link.mtu_max_bytes", "must be at least 1200"));
        }
        if !(200..=600_000).contains(&l.lease_ms) {
            return Err(self.invalid("link.lease_ms", "must be between 200 and 600000"));
        }
        if let Some(w) = &self.witness {
            if !valid_node_name(&w.name) || self.nodes.contains_key(&w.name) {
                return Err(self.invalid(
                    "witness.name",
                    "must be a DNS label naming the witness, not a data node",
                ));
            }
            if !(50..=60_000).contains(&w.request_timeout_ms) {
                return Err(
                    self.invalid("witness.request_timeout_ms", "must be between 50 and 60000")
                );
            }
        }
        for event in self.handlers.keys() {
            if !EVENTS.contains(&event.as_str()) {
                return Err(self.invalid(
                    format!("handlers.{event}"),
                    format!("unknown event; known events: {}", EVENTS.join(", ")),
                ));
            }
        }
        if !(1..=64).contains(&self.ublk.queues) {
            return Err(self.invalid("ublk.queues", "must be between 1 and 64"));
        }
        if !(1..=4096).contains(&self.ublk.depth) {
            return Err(self.invalid("ublk.depth", "must be between 1 and 4096"));
        }
        if l.reconnect_backoff_max_ms < 10 {
            return Err(self.invalid("link.reconnect_backoff_max_ms", "must be at least 10"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = format!("volume[{i}]");
            if !valid_volume_name(&v.name) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    "volume names are 1-64 characters from A-Z a-z 0-9 - _ .",
                ));
            }
            if !seen.insert(&v.name) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!("duplicate volume {:?}", v.name),
                ));
            }
            if !v.chunk_bytes.is_power_of_two() || !(4096..=1 << 20).contains(&v.chunk_bytes) {
                return Err(self.invalid(
                    format!("{key}.chunk_bytes"),
                    "must be a power of two between 4096 and 1048576",
                ));
            }
            if !(crate::meta::activity_log::AL_EXTENTS_MIN
                ..=crate::meta::activity_log::AL_EXTENTS_MAX)
                .contains(&v.al_extents)
            {
                return Err(self.invalid(
                    format!("{key}.al_extents"),
                    format!(
                        "must be between {} and {}",
                        crate::meta::activity_log::AL_EXTENTS_MIN,
                        crate::meta::activity_log::AL_EXTENTS_MAX
                    ),
                ));
            }
            if v.nodes.len() != 2 {
                return Err(self.invalid(
                    format!("{key}.nodes"),
                    format!("a volume has exactly two nodes, found {}", v.nodes.len()),
                ));
            }
            for (n, place) in &v.nodes {
                if !self.nodes.contains_key(n) {
                    return Err(self.invalid(
                        format!("{key}.nodes.{n}"),
                        format!("node {n:?} is not listed under [nodes]"),
                    ));
                }
                // A typo of "internal" must not become a file in whatever
                // directory the command runs in.
                if place.meta != "internal" && !Path::new(&place.meta).is_absolute() {
                    return Err(self.invalid(
                        format!("{key}.nodes.{n}.meta"),
                        format!(
                            "must be \"internal\" (at the end of the disk) or the absolute path of a metadata file, found {:?}",
                            place.meta
                        ),
                    ));
                }
            }
            if !v.nodes.contains_key(&self.node) {
                return Err(self.invalid(
                    format!("{key}.nodes"),
                    format!("volume {:?} is not on this node {:?}", v.name, self.node),
                ));
            }
        }
        Ok(())
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// This node's replication address.
    pub fn own_address(&self) -> SocketAddr {
        self.nodes[&self.node].address
    }
}

impl VolumeConfig {
    /// The peer node's name (the one that is not `me`).
    pub fn peer_of(&self, me: &str) -> Option<&str> {
        self.nodes.keys().map(String::as_str).find(|n| *n != me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "alpha"
control_socket = "/tmp/c.sock"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[nodes.alpha]
address = "127.0.0.1:7788"
[nodes.beta]
address = "127.0.0.2:7788"
[[volume]]
name = "vm-1"
nodes.alpha = { disk = "/tmp/a.img" }
nodes.beta = { disk = "/tmp/b.img", meta = "/tmp/b.meta" }
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/blkrep/test.toml"))
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.volumes[0].peer_of("alpha"), Some("beta"));
        assert_eq!(
            c.volumes[0].nodes["beta"].meta_location(),
            MetaLocation::External("/tmp/b.meta".into())
        );
        assert_eq!(c.link.peer_timeout_ms, 2000);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse(
            &GOOD
                .replace("chunk", "x")
                .replace("name = \"vm-1\"", "name = \"vm-1\"\nchunk_bytes = 1000"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("test.toml") && e.contains("volume[0].chunk_bytes"),
            "{e}"
        );
        let e = parse(&GOOD.replace("node = \"alpha\"", "node = \"gamma\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`node`"), "{e}");
        let e = parse(&GOOD.replace("[tls]", "typo = 1\n[tls]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("typo"), "{e}");
        let e = parse(&GOOD.replace("127.0.0.2:7788", "nowhere"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("address"), "{e}");
        let e = parse(&GOOD.replace(
            "nodes.beta = { disk = \"/tmp/b.img\", meta = \"/tmp/b.meta\" }",
            "",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("exactly two nodes"), "{e}");
        let e = parse(&GOOD.replace("[nodes.beta]", "[nodes.Beta_1]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("DNS label"), "{e}");
    }

    #[test]
    fn a_relative_metadata_path_is_refused() {
        for typo in ["internl", "meta/b.meta", "./b.meta", ""] {
            let e = parse(&GOOD.replace("meta = \"/tmp/b.meta\"", &format!("meta = {typo:?}")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("volume[0].nodes.beta.meta") && e.contains("absolute path"),
                "{typo}: {e}"
            );
        }
    }

    #[test]
    fn the_disk_cache_is_volatile_unless_declared_or_reported_otherwise() {
        let c = parse(GOOD).unwrap();
        let beta = &c.volumes[0].nodes["beta"];
        assert_eq!(beta.disk_cache, DiskCache::Auto);
        assert!(
            beta.volatile_cache(),
            "a backing file is never write-through"
        );
        let declared = GOOD.replace(
            "meta = \"/tmp/b.meta\" }",
            "meta = \"/tmp/b.meta\", disk_cache = \"power-loss-protected\" }",
        );
        let c = parse(&declared).unwrap();
        assert!(!c.volumes[0].nodes["beta"].volatile_cache());
        let e = parse(&GOOD.replace(
            "meta = \"/tmp/b.meta\" }",
            "meta = \"/tmp/b.meta\", disk_cache = \"battery\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("disk_cache") || e.contains("battery"), "{e}");
    }
}

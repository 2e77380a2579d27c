//! A real two-node cluster on one machine: fresh certificates, sparse files
//! as disks, one `blkrep daemon` process per node on 127.0.0.1 and
//! 127.0.0.2. Used by `blkrep demo`, `blkrep bench` and the integration
//! tests.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control::{self, NodeStatus, Request, Response, VolumeStatusReport};

/// Names of the two nodes.
pub const NODE_NAMES: [&str; 2] = ["alpha", "beta"];

/// Options of a local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Volume name.
    pub volume: String,
    /// Size of each backing file.
    pub disk_bytes: u64,
    /// Bitmap chunk size.
    pub chunk_bytes: u32,
    /// Peer failure detection time.
    pub peer_timeout_ms: u64,
    /// Allow `debug fail-disk`.
    pub fault_injection: bool,
    /// Every data disk gets a volatile write cache in its daemon's memory
    /// (implies `fault_injection`), which `power_cut` drops.
    pub volatile_cache: bool,
    /// Resync bandwidth cap (0 = unlimited).
    pub resync_rate_max_bytes_per_s: u64,
    /// Extents the main volume's activity log holds.
    pub al_extents: usize,
    /// Run a witness (a third process) and route every path (A-B, A-W,
    /// B-W) through a fault proxy that `cut` can silence.
    pub witness: bool,
    /// Every event handler appends "EVENT VOLUME" to the node's events.log.
    pub event_log: bool,
    /// Extra environment for every daemon and the witness (drills, e.g. a
    /// preloaded fake wall clock).
    pub env: Vec<(String, String)>,
    /// How the primary exports the volume: "nbd" or "ublk".
    pub export: String,
    /// More volumes beside `volume`, named `{volume}-{k}` (k from 1), each
    /// with its own disk file of `disk_bytes` (memory measurements).
    pub extra_volumes: u32,
}

/// A network path between two of the three processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPath {
    /// alpha - beta (the replication link).
    AlphaBeta,
    /// alpha - witness.
    AlphaWitness,
    /// beta - witness.
    BetaWitness,
}

/// The witness's files.
#[derive(Clone, Debug)]
pub struct WitnessFiles {
    /// Config file.
    pub config: PathBuf,
    /// State directory (its records).
    pub state_dir: PathBuf,
    /// Its address.
    pub address: SocketAddr,
    /// Its log.
    pub log: PathBuf,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            volume: "demo".into(),
            disk_bytes: 64 << 20,
            chunk_bytes: 64 * 1024,
            peer_timeout_ms: 2000,
            fault_injection: false,
            volatile_cache: false,
            resync_rate_max_bytes_per_s: 0,
            al_extents: crate::meta::activity_log::DEFAULT_AL_EXTENTS,
            witness: false,
            event_log: false,
            env: Vec::new(),
            export: "nbd".into(),
            extra_volumes: 0,
        }
    }
}

/// Errors of the local cluster helper.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Setup I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Certificates.
    #[error(transparent)]
    Cert(#[from] crate::cert::CertError),
    /// Metadata.
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    /// A daemon did not come up or a condition was not reached.
    #[error("{0}")]
    Timeout(String),
    /// The daemon refused a request.
    #[error("node {node}: {message}")]
    Refused {
        /// Node.
        node: String,
        /// Message.
        message: String,
    },
    /// Control socket problem.
    #[error(transparent)]
    Control(#[from] control::ControlError),
}

/// One node's files.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    /// Node name.
    pub name: String,
    /// Config file.
    pub config: PathBuf,
    /// Backing file.
    pub disk: PathBuf,
    /// Control socket.
    pub control: PathBuf,
    /// Run directory (NBD sockets).
    pub run_dir: PathBuf,
    /// Replication address.
    pub address: SocketAddr,
    /// Daemon log.
    pub log: PathBuf,
}

/// A running (or stopped) local cluster.
pub struct LocalCluster {
    /// Working directory (removed on drop unless `keep`).
    pub dir: PathBuf,
    /// The blkrep binary.
    pub bin: PathBuf,
    /// Node files.
    pub nodes: [NodeFiles; 2],
    /// Options used.
    pub opts: ClusterOptions,
    children: [Option<Child>; 2],
    /// Keep the directory on drop.
    pub keep: bool,
    /// The witness, when `opts.witness`.
    pub witness: Option<WitnessFiles>,
    witness_child: Option<Child>,
    proxies: Vec<(NetPath, super::proxy::UdpProxy)>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let w = what.into();
    move |e| ClusterError::Io(w, e)
}

/// Runs `bin --config CONFIG COMMAND` with its stderr appended to `log`.
fn spawn(
    bin: &Path,
    config: &Path,
    command: &str,
    log: &Path,
    env: &[(String, String)],
) -> Result<Child, ClusterError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("opening {}", log.display())))?;
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg(command)
        .env(
            "BLKREP_LOG",
            std::env::var("BLKREP_LOG").unwrap_or_else(|_| "info".into()),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(io(format!("starting {} {command}", bin.display())))
}

fn free_udp_port(ip: [u8; 4]) -> Result<SocketAddr, ClusterError> {
    let s = UdpSocket::bind(SocketAddr::from((ip, 0))).map_err(io("finding a free UDP port"))?;
    s.local_addr().map_err(io("finding a free UDP port"))
}

impl LocalCluster {
    /// Creates certificates, configs and disks with fresh metadata in `dir`.
    pub fn create(bin: &Path, dir: &Path, opts: ClusterOptions) -> Result<Self, ClusterError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let tls = dir.join("tls");
        crate::cert::create_ca(&tls)?;
        let addrs = [
            free_udp_port([127, 0, 0, 1])?,
            free_udp_port([127, 0, 0, 2])?,
        ];
        let files: Vec<NodeFiles> = NODE_NAMES
            .iter()
            .zip(addrs)
            .map(|(n, a)| {
                let nd = dir.join(n);
                NodeFiles {
                    name: n.to_string(),
                    config: nd.join("blkrep.toml"),
                    disk: nd.join("disk.img"),
                    control: nd.join("control.sock"),
                    run_dir: nd.join("run"),
                    address: a,
                    log: nd.join("daemon.log"),
                }
            })
            .collect();
        for f in &files {
            crate::cert::issue(&f.name, &tls, &tls, 3650)?;
            let nd = f.config.parent().unwrap_or(dir);
            std::fs::create_dir_all(nd).map_err(io("creating node dir"))?;
            let disk = std::fs::File::create(&f.disk).map_err(io("creating disk file"))?;
            disk.set_len(opts.disk_bytes)
                .map_err(io("sizing disk file"))?;
        }
        let mut proxies = Vec::new();
        let mut witness = None;
        let mut routes = Routes::default();
        if opts.witness {
            crate::cert::issue("witness", &tls, &tls, 3650)?;
            let wd = dir.join("witness");
            std::fs::create_dir_all(&wd).map_err(io("creating witness dir"))?;
            let w = WitnessFiles {
                config: wd.join("witness.toml"),
                state_dir: wd.join("state"),
                address: free_udp_port([127, 0, 0, 3])?,
                log: wd.join("witness.log"),
            };
            let text = format!(
                "node = \"witness\"\nlisten = \"{}\"\nstate_dir = \"{}\"\nnodes = [\"alpha\", \"beta\"]\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                w.address,
                w.state_dir.display(),
                tls.join("ca.pem").display(),
                tls.join("witness.pem").display(),
                tls.join("witness.key").display(),
            );
            std::fs::write(&w.config, text).map_err(io("writing witness config"))?;
            let proxy = |ip, target, path| {
                super::proxy::UdpProxy::start(ip, target)
                    .map(|p| (path, p))
                    .map_err(io("starting a fault proxy"))
            };
            proxies.push(proxy([127, 0, 0, 1], files[1].address, NetPath::AlphaBeta)?);
            proxies.push(proxy([127, 0, 0, 1], w.address, NetPath::AlphaWitness)?);
            proxies.push(proxy([127, 0, 0, 2], w.address, NetPath::BetaWitness)?);
            routes = Routes {
                alpha_to_beta: Some(proxies[0].1.listen),
                witness_for: [Some(proxies[1].1.listen), Some(proxies[2].1.listen)],
            };
            witness = Some(w);
        }
        for (i, f) in files.iter().enumerate() {
            let text = config_text(f, &files, &tls, &opts, &routes, i);
            std::fs::write(&f.config, text).map_err(io("writing config"))?;
            crate::volume::create_metadata(
                &f.disk,
                &crate::config::MetaLocation::Internal,
                &opts.volume,
                opts.chunk_bytes,
                false,
            )?;
            for k in 1..=opts.extra_volumes {
                let disk = extra_disk(&f.disk, k);
                let d = std::fs::File::create(&disk).map_err(io("creating disk file"))?;
                d.set_len(opts.disk_bytes).map_err(io("sizing disk file"))?;
                crate::volume::create_metadata(
                    &disk,
                    &crate::config::MetaLocation::Internal,
                    &extra_volume(&opts.volume, k),
                    opts.chunk_bytes,
                    false,
                )?;
            }
        }
        let [a, b]: [NodeFiles; 2] = files
            .try_into()
            .map_err(|_| ClusterError::Timeout("internal: node list".into()))?;
        Ok(LocalCluster {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            nodes: [a, b],
            opts,
            children: [None, None],
            keep: false,
            witness,
            witness_child: None,
            proxies,
        })
    }

    /// Starts the witness process and waits until it listens.
    pub async fn start_witness(&mut self) -> Result<(), ClusterError> {
        let Some(w) = &self.witness else {
            return Err(ClusterError::Timeout("this cluster has no witness".into()));
        };
        let child = spawn(&self.bin, &w.config, "witness", &w.log, &self.opts.env)?;
        self.witness_child = Some(child);
        // It is up once its port is taken.
        let deadline = Instant::now() + Duration::from_secs(15);
        while UdpSocket::bind(w.address).is_ok() {
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout("witness did not start".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the witness with SIGKILL.
    pub fn kill_witness(&mut self) {
        if let Some(mut c) = self.witness_child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Deletes the witness's records (a witness whose disk was lost).
    pub fn wipe_witness_state(&self) -> Result<(), ClusterError> {
        if let Some(w) = &self.witness {
            match std::fs::remove_dir_all(&w.state_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ClusterError::Io("wiping witness state".into(), e)),
            }
        }
        Ok(())
    }

    /// Silences (true) or restores (false) a network path.
    pub fn cut(&self, path: NetPath, cut: bool) {
        self.each_proxy(path, |p| p.set_cut(cut));
    }

    /// Silences (true) or restores (false) one direction of a path: what
    /// the dialing side sends (alpha on `AlphaBeta`, the node on a witness
    /// path); it keeps hearing the other side.
    pub fn cut_from_dialer(&self, path: NetPath, cut: bool) {
        self.each_proxy(path, |p| p.set_cut_from_client(cut));
    }

    /// Drops a share of the packets on a path (per mille; 0 = none).
    pub fn set_loss(&self, path: NetPath, permille: u64) {
        self.each_proxy(path, |p| p.set_loss_permille(permille));
    }

    /// Delays every packet on a path (each direction).
    pub fn set_delay(&self, path: NetPath, delay: Duration) {
        self.each_proxy(path, |p| p.set_delay(delay));
    }

    /// Replays every packet on a path `after` it was forwarded (zero: off).
    pub fn set_replay(&self, path: NetPath, after: Duration) {
        self.each_proxy(path, |p| p.set_replay(after));
    }

    /// Packets replayed on a path so far.
    pub fn replayed(&self, path: NetPath) -> u64 {
        self.proxies
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, proxy)| proxy.replayed())
            .sum()
    }

    fn each_proxy(&self, path: NetPath, f: impl Fn(&super::proxy::UdpProxy)) {
        for (p, proxy) in &self.proxies {
            if *p == path {
                f(proxy);
            }
        }
    }

    /// The events node `i`'s handlers logged (with `opts.event_log`).
    pub fn events(&self, i: usize) -> Vec<String> {
        std::fs::read_to_string(self.events_log(i))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn events_log(&self, i: usize) -> PathBuf {
        self.nodes[i].run_dir.with_file_name("events.log")
    }

    /// Starts node `i`'s daemon and waits until its control socket answers.
    pub async fn start(&mut self, i: usize) -> Result<(), ClusterError> {
        let n = &self.nodes[i];
        let child = spawn(&self.bin, &n.config, "daemon", &n.log, &self.opts.env)?;
        self.children[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if control::call(&n.control, &Request::Status { volume: None })
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(c) = self.children[i].as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                return Err(ClusterError::Timeout(format!(
                    "daemon {} exited with {st}; see {}",
                    n.name,
                    n.log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "daemon {} did not start",
                    n.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts node `i`'s daemon again and attaches the volume (as secondary).
    pub async fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.start(i).await?;
        self.ok(
            i,
            Request::Attach {
                volume: self.opts.volume.clone(),
            },
        )
        .await
        .map(|_| ())
    }

    /// Makes node `i` primary (without force: it must be up to date).
    pub async fn promote(&self, i: usize) -> Result<(), ClusterError> {
        self.ok(
            i,
            Request::Primary {
                volume: self.opts.volume.clone(),
                force: false,
            },
        )
        .await
        .map(|_| ())
    }

    /// Kills node `i`'s daemon with SIGKILL (a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Node `i` loses power (needs `volatile_cache`): its daemon keeps a
    /// seeded subset of the writes no flush covered, the next start sees
    /// another boot, and it is gone when this returns.
    pub async fn power_cut(&mut self, i: usize, seed: u64) -> Result<(), ClusterError> {
        // The daemon ends without answering.
        let _ = self.call(i, Request::PowerCut { seed }).await;
        if let Some(mut c) = self.children[i].take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(ClusterError::Timeout(format!(
                        "daemon {} did not end at its power cut",
                        self.nodes[i].name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// Stops node `i`'s daemon with SIGTERM and waits for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            // SAFETY: kill(2) on the pid of a child we spawned and still own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// PID of node `i`'s daemon.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    /// Sends a control request to node `i`.
    pub async fn call(&self, i: usize, req: Request) -> Result<Response, ClusterError> {
        Ok(control::call(&self.nodes[i].control, &req).await?)
    }

    /// Sends a request and requires success.
    pub async fn ok(&self, i: usize, req: Request) -> Result<String, ClusterError> {
        match self.call(i, req).await? {
            Response::Ok { message } => Ok(message),
            Response::Error { message, .. } => Err(ClusterError::Refused {
                node: self.nodes[i].name.clone(),
                message,
            }),
            Response::Status(_) => Ok(String::new()),
        }
    }

    /// Status of the volume on node `i`.
    pub async fn status(&self, i: usize) -> Result<VolumeStatusReport, ClusterError> {
        match self
            .call(
                i,
                Request::Status {
                    volume: Some(self.opts.volume.clone()),
                },
            )
            .await?
        {
            Response::Status(NodeStatus { mut volumes, .. }) if !volumes.is_empty() => {
                Ok(volumes.remove(0))
            }
            other => Err(ClusterError::Refused {
                node: self.nodes[i].name.clone(),
                message: format!("unexpected status answer {other:?}"),
            }),
        }
    }

    /// Polls node `i` until `pred` holds on its volume status.
    /// Waits until node `i`'s view of the witness record lists both
    /// copies as up to date.
    pub async fn wait_both_up_to_date(
        &self,
        i: usize,
        timeout: Duration,
    ) -> Result<VolumeStatusReport, ClusterError> {
        self.wait_for(i, "both up to date at the witness", timeout, |s| {
            s.quorum
                .as_ref()
                .is_some_and(|q| q.up_to_date && q.peer_up_to_date)
        })
        .await
    }

    pub async fn wait_for(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&VolumeStatusReport) -> bool,
    ) -> Result<VolumeStatusReport, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(i).await;
            if let Ok(s) = &s
                && pred(s)
            {
                return Ok(s.clone());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "node {}: {what} not reached within {timeout:?}; last status {s:?}",
                    self.nodes[i].name
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until both nodes report the volume connected and in sync.
    pub async fn wait_in_sync(&self, timeout: Duration) -> Result<(), ClusterError> {
        for i in 0..2 {
            self.wait_for(i, "in sync", timeout, |s| {
                s.peer.relation.as_deref() == Some("InSync")
                    && s.disk.as_deref() == Some("UpToDate")
                    && s.peer.disk.as_deref() == Some("UpToDate")
            })
            .await?;
        }
        Ok(())
    }

    /// Starts both daemons, attaches the volume on both, makes node 0 the
    /// first primary (forced: fresh metadata has no data history) and waits
    /// for the initial sync.
    pub async fn bring_up(&mut self) -> Result<(), ClusterError> {
        if self.witness.is_some() && self.witness_child.is_none() {
            self.start_witness().await?;
        }
        for i in 0..2 {
            self.start(i).await?;
        }
        for i in 0..2 {
            self.ok(
                i,
                Request::Attach {
                    volume: self.opts.volume.clone(),
                },
            )
            .await?;
        }
        self.ok(
            0,
            Request::Primary {
                volume: self.opts.volume.clone(),
                force: true,
            },
        )
        .await?;
        self.wait_in_sync(Duration::from_secs(120)).await
    }

    /// The NBD socket of node `i`.
    pub fn nbd_socket(&self, i: usize) -> PathBuf {
        crate::frontend::nbd_socket_path(&self.nodes[i].run_dir, &self.opts.volume)
    }

    /// The data area of node `i`'s disk (the bytes a client sees).
    pub fn read_data(&self, i: usize, data_bytes: u64) -> Result<Vec<u8>, ClusterError> {
        let mut v = std::fs::read(&self.nodes[i].disk).map_err(io("reading disk file"))?;
        v.truncate(data_bytes as usize);
        Ok(v)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..2 {
            self.kill(i);
        }
        self.kill_witness();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where each node reaches the others (proxies when the cluster has a
/// witness).
#[derive(Default)]
struct Routes {
    alpha_to_beta: Option<SocketAddr>,
    witness_for: [Option<SocketAddr>; 2],
}

fn config_text(
    me: &NodeFiles,
    all: &[NodeFiles],
    tls: &Path,
    opts: &ClusterOptions,
    routes: &Routes,
    index: usize,
) -> String {
    let mut t = format!(
        "node = \"{}\"\ncontrol_socket = \"{}\"\nrun_dir = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[link]\npeer_timeout_ms = {}\nkeepalive_interval_ms = {}\nreconnect_backoff_max_ms = 500\n\n[debug]\nfault_injection = {}\nvolatile_cache = {}\n\n",
        me.name,
        me.control.display(),
        me.run_dir.display(),
        tls.join("ca.pem").display(),
        tls.join(format!("{}.pem", me.name)).display(),
        tls.join(format!("{}.key", me.name)).display(),
        opts.peer_timeout_ms,
        (opts.peer_timeout_ms / 4).max(50),
        opts.fault_injection || opts.volatile_cache,
        opts.volatile_cache,
    );
    if let Some(w) = routes.witness_for[index] {
        t.push_str(&format!(
            "[witness]\nname = \"witness\"\naddress = \"{w}\"\n\n"
        ));
    }
    if opts.event_log {
        let log = me.run_dir.with_file_name("events.log");
        t.push_str("[handlers]\n");
        for e in crate::config::EVENTS {
            t.push_str(&format!(
                "\"{e}\" = \"echo \\\"$BLKREP_EVENT $BLKREP_VOLUME\\\" >> {}\"\n",
                log.display()
            ));
        }
        t.push('\n');
    }
    for n in all {
        let address = match routes.alpha_to_beta {
            Some(a) if index == 0 && n.name == "beta" => a,
            _ => n.address,
        };
        t.push_str(&format!("[nodes.{}]\naddress = \"{}\"\n", n.name, address));
    }
    t.push_str(&format!(
        "\n[[volume]]\nname = \"{}\"\nchunk_bytes = {}\nresync_rate_max_bytes_per_s = {}\nal_extents = {}\nexport = \"{}\"\n",
        opts.volume,
        opts.chunk_bytes,
        opts.resync_rate_max_bytes_per_s,
        opts.al_extents,
        opts.export
    ));
    for n in all {
        t.push_str(&format!(
            "nodes.{} = {{ disk = \"{}\", meta = \"internal\" }}\n",
            n.name,
            n.disk.display()
        ));
    }
    for k in 1..=opts.extra_volumes {
        t.push_str(&format!(
            "\n[[volume]]\nname = \"{}\"\nchunk_bytes = {}\nexport = \"{}\"\n",
            extra_volume(&opts.volume, k),
            opts.chunk_bytes,
            opts.export
        ));
        for n in all {
            t.push_str(&format!(
                "nodes.{} = {{ disk = \"{}\", meta = \"internal\" }}\n",
                n.name,
                extra_disk(&n.disk, k).display()
            ));
        }
    }
    t
}

/// The name of extra volume `k`.
pub fn extra_volume(volume: &str, k: u32) -> String {
    format!("{volume}-{k}")
}

/// The disk file of extra volume `k` next to the main disk.
fn extra_disk(disk: &Path, k: u32) -> PathBuf {
    disk.with_file_name(format!("disk-{k}.img"))
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "blkrep-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

//! The node agent (`blkrep daemon`): one QUIC endpoint, one connection per
//! peer node, one io_uring (driven from the async runtime), the control
//! socket, and the attached volumes.
//!
//! Per-volume cost: one tokio task for the engine, one for metadata writes,
//! one for control messages, the in-memory bitmap (one bit per chunk: 20 KiB
//! for 10 GiB at 64 KiB chunks), and buffers only for I/O in flight.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use crate::cert::validity::{CertificateKind, Validity};
use crate::config::Config;
use crate::control::server::{self, ControlHandler};
use crate::control::status::{CertificateReport, NodeStatus, VolumeStatusReport};
use crate::control::{ErrorCode, Request, Response};
use crate::engine::PromoteError;
use crate::frontend::ublk::UblkOptions;
use crate::frontend::{Export, ExportKind};
use crate::link::tls::TlsMaterial;
use crate::link::{
    InboundHandler, InboundRequest, Link, LinkSettings, PeerConnection, VolumeStateMsg,
};
use crate::quorum::LeaseSettings;
use crate::store::FaultPlan;
use crate::store::uring::Uring;
use crate::volume::{self, AttachOptions, QuorumAttach, VolumeError, VolumeHandle};
use crate::witness::{Claim, WitnessClient};

/// Daemon start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] crate::link::tls::TlsError),
    /// Link setup.
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// Witness session setup.
    #[error(transparent)]
    Witness(#[from] crate::witness::WitnessError),
    /// Local setup.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
}

struct Attached {
    handle: VolumeHandle,
    peer: String,
    faults: Arc<FaultPlan>,
}

/// A volume's place in `Daemon::attaching` while its attach runs; released
/// on drop.
struct AttachingGuard<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    name: String,
}

impl<'a> AttachingGuard<'a> {
    /// Claims `name`; None while another attach of it runs.
    fn claim(set: &'a Mutex<std::collections::HashSet<String>>, name: &str) -> Option<Self> {
        let mut s = set.lock().ok()?;
        s.insert(name.to_string()).then(|| AttachingGuard {
            set,
            name: name.to_string(),
        })
    }
}

impl Drop for AttachingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.name);
        }
    }
}

/// How long `demote` and `detach` wait for requests in flight whose
/// clients are gone.
const STEP_DOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How long `demote` and `detach` wait for clients that are closing their
/// connections before calling the export in use.
const CLIENT_GONE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// How long `promote` waits for the new primary's export to come up.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The running agent.
pub struct Daemon {
    cfg: Config,
    ring: Uring,
    link: Mutex<Option<Arc<Link>>>,
    volumes: Mutex<HashMap<String, Attached>>,
    /// Volumes whose attach is reading their metadata (on a blocking
    /// thread): a second attach of one of them is refused until it is done.
    attaching: Mutex<std::collections::HashSet<String>>,
    exports: Mutex<HashMap<String, Export>>,
    /// Why the last export of a volume could not start.
    export_failures: Mutex<HashMap<String, String>>,
    /// Woken whenever an export started, failed or stopped.
    export_changed: tokio::sync::Notify,
    witness: Option<Arc<WitnessClient>>,
    /// Who may use the control socket and the NBD exports.
    access: crate::access::Access,
    /// This node's certificate and the CA, as loaded at start.
    certificates: Vec<(CertificateKind, Validity)>,
    me: Weak<Daemon>,
}

impl Daemon {
    /// Starts the agent: io_uring, link, control socket. Returns once all
    /// are listening; they keep running on the tokio runtime.
    pub async fn start(cfg: Config) -> Result<Arc<Self>, DaemonError> {
        let ring = Uring::start().map_err(|source| DaemonError::Io {
            what: "cannot set up io_uring".into(),
            source,
        })?;
        let tls = TlsMaterial::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        let certificates = crate::cert::watch::loaded(&cfg.tls.ca, &cfg.tls.cert);
        let group = match &cfg.control_group {
            Some(g) => Some(server::resolve_group(g).map_err(|why| DaemonError::Io {
                what: format!("control_group `{g}`: {why}"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "unknown group"),
            })?),
            None => None,
        };
        let listener =
            server::bind(&cfg.control_socket, group).map_err(|source| DaemonError::Io {
                what: format!(
                    "cannot bind control socket {}",
                    cfg.control_socket.display()
                ),
                source,
            })?;
        crate::quorum::clock::start();
        // NBD sockets a crashed daemon left behind: clients get "no such
        // file" (nothing exported here) instead of a refused connection.
        // This daemon owns the control socket now, so none of them is live.
        for v in &cfg.volumes {
            let path = crate::frontend::nbd_socket_path(&cfg.run_dir, &v.name);
            if std::fs::symlink_metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(&path);
            }
        }
        let witness = match &cfg.witness {
            Some(w) => Some(WitnessClient::new(
                &w.name,
                w.address,
                &tls,
                w.request_timeout_ms,
            )?),
            None => None,
        };
        let daemon = Arc::new_cyclic(|me| Daemon {
            witness: witness.clone(),
            cfg: cfg.clone(),
            ring,
            link: Mutex::new(None),
            volumes: Mutex::new(HashMap::new()),
            attaching: Mutex::new(std::collections::HashSet::new()),
            exports: Mutex::new(HashMap::new()),
            export_failures: Mutex::new(HashMap::new()),
            export_changed: tokio::sync::Notify::new(),
            access: crate::access::Access::new(group),
            certificates: certificates.clone(),
            me: me.clone(),
        });
        let peers: Vec<(String, std::net::SocketAddr)> = cfg
            .nodes
            .iter()
            .map(|(n, c)| (n.clone(), c.address))
            .collect();
        let handler: Arc<dyn InboundHandler> = daemon.clone();
        let link = Link::start(
            &cfg.node,
            cfg.own_address(),
            &peers,
            &tls,
            LinkSettings::from(&cfg.link),
            handler,
        )?;
        if let Ok(mut l) = daemon.link.lock() {
            *l = Some(link);
        }
        if let Some(w) = witness {
            tokio::spawn(heartbeat_loop(
                Arc::downgrade(&daemon),
                w,
                cfg.link.lease_ms,
            ));
        }
        tokio::spawn(crate::cert::watch::watch(certificates));
        let control: Arc<dyn ControlHandler> = daemon.clone();
        tokio::spawn(server::serve(listener, control, daemon.access));
        tracing::info!(
            "blkrep daemon {} up: replication on {}, control socket {}",
            cfg.node,
            cfg.own_address(),
            cfg.control_socket.display()
        );
        Ok(daemon)
    }

    /// Detaches every volume (best effort) and closes the link.
    pub async fn shutdown(&self) {
        let handles: Vec<(String, VolumeHandle)> = self
            .volumes
            .lock()
            .map(|v| {
                v.iter()
                    .map(|(n, a)| (n.clone(), a.handle.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (name, h) in handles {
            // A primary flushes what it completed on both copies before it
            // steps down (a `Demote` error while that runs): retry a while.
            let deadline = std::time::Instant::now() + STEP_DOWN_DRAIN;
            loop {
                match h.detach().await {
                    Err(VolumeError::Demote(_)) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        tracing::warn!("volume {name}: not detached cleanly: {e}");
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
        if let Some(link) = self.link.lock().ok().and_then(|l| l.clone()) {
            link.shutdown();
        }
        let _ = std::fs::remove_file(&self.cfg.control_socket);
    }

    fn volume(&self, name: &str) -> Option<VolumeHandle> {
        self.volumes
            .lock()
            .ok()?
            .get(name)
            .map(|a| a.handle.clone())
    }

    /// The fault plan of an attached volume (drills only).
    fn fault_plan(&self, volume: &str) -> Result<Arc<FaultPlan>, Response> {
        if !self.cfg.debug.fault_injection {
            return Err(err(
                ErrorCode::BadRequest,
                "fault injection is disabled (debug.fault_injection)".into(),
            ));
        }
        self.volumes
            .lock()
            .ok()
            .and_then(|v| v.get(volume).map(|a| a.faults.clone()))
            .ok_or_else(|| not_attached(volume))
    }

    /// `debug power-cut`: see `Request::PowerCut`. Returns only when it
    /// cannot cut (no volatile caches).
    fn power_cut(&self, seed: u64) -> Response {
        if !self.cfg.debug.fault_injection || !self.cfg.debug.volatile_cache {
            return err(
                ErrorCode::BadRequest,
                "a power cut needs debug.fault_injection and debug.volatile_cache".into(),
            );
        }
        // The next start must see another boot (see `debug_boot_id`).
        let boot = crate::testkit::rng::SplitMix64(seed ^ 0xb007).next_u64();
        let _ = std::fs::write(fake_boot_id_path(&self.cfg), format!("{boot:032x}"));
        let mut lost = Vec::new();
        if let Ok(volumes) = self.volumes.lock() {
            for (i, (name, a)) in volumes.iter().enumerate() {
                let disk = self
                    .cfg
                    .volumes
                    .iter()
                    .find(|v| &v.name == name)
                    .and_then(|v| v.nodes.get(&self.cfg.node))
                    .map(|n| n.disk.clone());
                if let Some(disk) = disk {
                    match a.faults.power_cut(&disk, seed ^ i as u64) {
                        Ok((kept, dropped)) => {
                            lost.push(format!("{name}: kept {kept}, lost {dropped}"))
                        }
                        Err(e) => lost.push(format!("{name}: {e}")),
                    }
                }
            }
        }
        eprintln!(
            "blkrep: power cut (cached writes per volume: {})",
            lost.join("; ")
        );
        // SAFETY: _exit ends the process at once, as a power cut does:
        // nothing runs after it, so no state can be observed half-updated.
        unsafe { libc::_exit(137) }
    }

    /// Waits (bounded) until the export of a volume that just became
    /// primary is up; its endpoint, or why it is not.
    async fn exported(&self, volume: &str) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + EXPORT_WAIT;
        loop {
            let changed = self.export_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self
                .exports
                .lock()
                .ok()
                .and_then(|x| x.get(volume).map(Export::endpoint))
            {
                return Ok(e);
            }
            if let Some(why) = self
                .export_failures
                .lock()
                .ok()
                .and_then(|f| f.get(volume).cloned())
            {
                return Err(format!("its export failed: {why}"));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(format!(
                    "its export is not up after {} s (see the daemon log)",
                    EXPORT_WAIT.as_secs()
                ));
            }
        }
    }

    fn export_hook(&self) -> volume::ExportHook {
        let me = self.me.clone();
        Arc::new(move |handle: &VolumeHandle, on: bool| {
            let me = me.clone();
            let handle = handle.clone();
            // Starting or stopping a ublk device blocks: keep it off the
            // volume task.
            tokio::task::spawn_blocking(move || {
                let Some(d) = me.upgrade() else { return };
                let old = d
                    .exports
                    .lock()
                    .ok()
                    .and_then(|mut e| e.remove(handle.name()));
                if let Some(mut old) = old {
                    old.stop();
                }
                if let Ok(mut f) = d.export_failures.lock() {
                    f.remove(handle.name());
                }
                if !on {
                    // Another node may be primary now: a device this node's
                    // dead daemon left behind must not wait forever.
                    crate::frontend::ublk::remove_stale(&d.cfg.run_dir, handle.name());
                    return;
                }
                let kind = d
                    .cfg
                    .volume(handle.name())
                    .map(|v| v.export)
                    .unwrap_or_default();
                let opts = UblkOptions {
                    queues: d.cfg.ublk.queues,
                    depth: d.cfg.ublk.depth,
                    user_copy: d.cfg.ublk.user_copy,
                };
                match Export::start(handle.clone(), kind, &d.cfg.run_dir, opts, d.access) {
                    Ok(e) => {
                        tracing::info!("volume {} exported at {}", handle.name(), e.endpoint());
                        if let Ok(mut x) = d.exports.lock() {
                            x.insert(handle.name().to_string(), e);
                        }
                    }
                    Err(e) => {
                        tracing::error!("volume {}: cannot start export: {e}", handle.name());
                        if let Ok(mut f) = d.export_failures.lock() {
                            f.insert(handle.name().to_string(), e.to_string());
                        }
                    }
                }
                d.export_changed.notify_waiters();
            });
        })
    }

    /// The quorum session a volume shared with `peer` takes part in.
    fn quorum_for(&self, peer: &str) -> Option<QuorumAttach> {
        let witness = self.witness.clone()?;
        let policy = self.cfg.witness.as_ref()?.on_no_quorum;
        let peer_lease = self
            .link
            .lock()
            .ok()?
            .as_ref()
            .and_then(|l| l.peer_lease(peer))?;
        Some(QuorumAttach {
            witness,
            policy,
            peer_lease,
            peer_lease_settings: LeaseSettings {
                lease_ms: self.cfg.link.lease_ms,
                ..Default::default()
            },
        })
    }

    /// Runs the configured handler for an event: `sh -c COMMAND` with
    /// BLKREP_EVENT, BLKREP_VOLUME, BLKREP_NODE in the environment.
    fn event_hook(&self) -> volume::EventHook {
        let handlers = self.cfg.handlers.clone();
        let node = self.cfg.node.clone();
        Arc::new(move |volume: &str, event: &str| {
            tracing::info!("volume {volume}: event {event}");
            let Some(cmd) = handlers.get(event).cloned() else {
                return;
            };
            let (volume, event, node) = (volume.to_string(), event.to_string(), node.clone());
            std::thread::spawn(move || {
                let status = std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(&cmd)
                    .env("BLKREP_EVENT", &event)
                    .env("BLKREP_VOLUME", &volume)
                    .env("BLKREP_NODE", &node)
                    .stdin(std::process::Stdio::null())
                    .status();
                match status {
                    Ok(s) if s.success() => {}
                    Ok(s) => tracing::warn!("handler for {event} on {volume} exited with {s}"),
                    Err(e) => tracing::warn!("handler for {event} on {volume} did not run: {e}"),
                }
            });
        })
    }

    async fn attach(&self, name: &str) -> Response {
        let Some(vcfg) = self.cfg.volume(name) else {
            return err(
                ErrorCode::BadRequest,
                format!("volume {name:?} is not in {}", self.cfg.path.display()),
            );
        };
        let (Some(node_cfg), Some(peer)) =
            (vcfg.nodes.get(&self.cfg.node), vcfg.peer_of(&self.cfg.node))
        else {
            return err(
                ErrorCode::BadRequest,
                format!("volume {name:?} is not configured on this node"),
            );
        };
        if vcfg.export == ExportKind::Ublk
            && let Err(e) = crate::frontend::ublk::driver_features()
        {
            return err(ErrorCode::Failed, format!("cannot attach {name}: {e}"));
        }
        let index = self
            .cfg
            .volumes
            .iter()
            .position(|v| v.name == name)
            .unwrap_or(0) as u32;
        let faults = FaultPlan::healthy();
        if self.cfg.debug.fault_injection && self.cfg.debug.volatile_cache {
            faults.enable_volatile_cache();
        }
        let opts = AttachOptions {
            name: name.to_string(),
            index,
            disk: node_cfg.disk.clone(),
            meta: node_cfg.meta_location(),
            node: self.cfg.node.clone(),
            peer: peer.to_string(),
            resync_rate: crate::resync::RateSettings {
                min_bytes_per_s: vcfg.resync_rate_min_bytes_per_s,
                max_bytes_per_s: vcfg.resync_rate_max_bytes_per_s,
                app_latency_target: std::time::Duration::from_millis(
                    vcfg.resync_app_latency_target_ms,
                ),
            },
            al_extents: vcfg.al_extents,
            volatile_cache: node_cfg.volatile_cache() || self.cfg.debug.volatile_cache,
            boot_id: debug_boot_id(&self.cfg).or_else(crate::store::backing::boot_id),
            ring: self.ring.clone(),
            faults: self.cfg.debug.fault_injection.then(|| faults.clone()),
            export: self.export_hook(),
            events: self.event_hook(),
            quorum: self.quorum_for(peer),
        };
        let Some(_attaching) = AttachingGuard::claim(&self.attaching, name) else {
            return err(
                ErrorCode::Busy,
                format!(
                    "volume {name} is being attached (its disk is being read); try again once that is done"
                ),
            );
        };
        if self.volume(name).is_some() {
            return Response::Ok {
                message: format!("volume {name} is already attached"),
            };
        }
        // (The metadata reads and writes run on a blocking thread: a slow
        // disk delays this answer only.)
        let handle = match volume::attach(opts).await {
            Ok(h) => h,
            Err(e) => return err(ErrorCode::Failed, format!("cannot attach {name}: {e}")),
        };
        let conn = self
            .link
            .lock()
            .ok()
            .and_then(|l| l.as_ref().and_then(|l| l.connection(peer)));
        if let Ok(mut v) = self.volumes.lock() {
            v.insert(
                name.to_string(),
                Attached {
                    handle: handle.clone(),
                    peer: peer.to_string(),
                    faults,
                },
            );
        }
        if let Some(c) = conn {
            handle.connection_changed(Some(c));
        }
        tracing::info!("volume {name} attached");
        Response::Ok {
            message: format!("volume {name} attached"),
        }
    }

    /// The rule `demote` and `detach` share (as DRBD refuses `secondary`
    /// and `down` while the device is open): an export in use (an NBD
    /// client connected, the ublk device mounted or held open exclusively)
    /// is refused with exit 9 unless `force`, which disconnects its users
    /// first; their requests in flight fail or finish.
    async fn release_export(&self, name: &str, force: bool) -> Result<(), Response> {
        let users = || {
            self.exports
                .lock()
                .ok()
                .and_then(|x| x.get(name).and_then(Export::users))
        };
        // A client that has just closed its connection is gone once the
        // server saw the close: give that a moment, so that the answer does
        // not depend on timing.
        let deadline = std::time::Instant::now() + CLIENT_GONE_GRACE;
        let mut seen = users();
        while seen.is_some() && !force && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            seen = users();
        }
        let Some(users) = seen else {
            return Ok(());
        };
        if !force {
            return Err(err(
                ErrorCode::Busy,
                format!(
                    "volume {name} is in use: {users}; stop the application first, or use --force to disconnect it (its requests in flight fail)"
                ),
            ));
        }
        tracing::warn!("volume {name}: {users}; disconnecting them (--force)");
        if let Some(mut e) = self.exports.lock().ok().and_then(|mut x| x.remove(name)) {
            let _ = tokio::task::spawn_blocking(move || e.stop()).await;
        }
        Ok(())
    }

    /// Runs `step` (a demote or a detach) once the export is released;
    /// requests still finishing after their client left are waited for
    /// (bounded), so the outcome does not depend on timing.
    async fn step_down<F, Fut>(&self, name: &str, force: bool, step: F) -> Result<(), Response>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), VolumeError>>,
    {
        self.release_export(name, force).await?;
        let deadline = std::time::Instant::now() + STEP_DOWN_DRAIN;
        loop {
            match step().await {
                Err(VolumeError::Demote(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(volume_err(e)),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn detach(&self, name: &str, force: bool) -> Response {
        let Some(h) = self.volume(name) else {
            return not_attached(name);
        };
        let stopped = |response: Response| {
            if let Ok(mut v) = self.volumes.lock() {
                v.remove(name);
            }
            if let Some(mut e) = self.exports.lock().ok().and_then(|mut x| x.remove(name)) {
                tokio::task::spawn_blocking(move || e.stop());
            }
            response
        };
        match self.step_down(name, force, || h.detach()).await {
            Ok(()) => stopped(Response::Ok {
                message: format!("volume {name} detached"),
            }),
            // Stopped all the same: it is no longer attached here.
            Err(response) if h.is_stopped() => stopped(response),
            Err(response) => response,
        }
    }

    async fn status(&self, only: Option<&str>) -> Response {
        let mut volumes = Vec::new();
        for v in &self.cfg.volumes {
            if only.is_some_and(|o| o != v.name) {
                continue;
            }
            let peer = v.peer_of(&self.cfg.node).unwrap_or("");
            let backing = v
                .nodes
                .get(&self.cfg.node)
                .map(|n| n.disk.display().to_string())
                .unwrap_or_default();
            let report = match self.volume(&v.name) {
                Some(h) => match h.status().await {
                    Ok(s) => {
                        let export = self
                            .exports
                            .lock()
                            .ok()
                            .and_then(|e| e.get(&v.name).map(Export::endpoint));
                        let mut r = VolumeStatusReport::from_volume(&v.name, &s, export);
                        let link = self.link.lock().ok().and_then(|l| l.clone());
                        if let Some(p) = link.and_then(|l| l.connection_problem(peer)) {
                            r.peer.last_error = Some(p.message);
                            r.peer.last_error_at_unix_s = Some(p.at_unix_s);
                        }
                        r
                    }
                    Err(_) => VolumeStatusReport::detached(&v.name, &backing, peer),
                },
                None => VolumeStatusReport::detached(&v.name, &backing, peer),
            };
            volumes.push(report);
        }
        if let Some(o) = only
            && volumes.is_empty()
        {
            return err(
                ErrorCode::BadRequest,
                format!("volume {o:?} is not configured"),
            );
        }
        Response::Status(NodeStatus {
            schema: 1,
            node: self.cfg.node.clone(),
            volumes,
            certificates: self.certificate_reports(),
        })
    }

    /// The certificates this node depends on: its own and the CA's as
    /// loaded, each peer's and the witness's as last presented.
    fn certificate_reports(&self) -> Vec<CertificateReport> {
        let now = crate::cert::validity::now_unix_s();
        let mut seen = self.certificates.clone();
        if let Some(link) = self.link.lock().ok().and_then(|l| l.clone()) {
            for peer in self.cfg.nodes.keys().filter(|n| **n != self.cfg.node) {
                if let Some(v) = link.peer_certificate(peer) {
                    seen.push((CertificateKind::Peer, v));
                }
            }
        }
        if let Some(v) = self.witness.as_ref().and_then(|w| w.certificate()) {
            seen.push((CertificateKind::Witness, v));
        }
        seen.iter()
            .map(|(kind, v)| CertificateReport::new(*kind, v, now))
            .collect()
    }
}

fn err(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

fn not_attached(name: &str) -> Response {
    err(
        ErrorCode::NotAttached,
        format!("volume {name} is not attached on this node (run `blkrep attach {name}`)"),
    )
}

fn volume_err(e: VolumeError) -> Response {
    let code = match &e {
        VolumeError::Promote(PromoteError::PeerPrimary | PromoteError::PeerLease(_)) => {
            ErrorCode::PeerPrimary
        }
        VolumeError::Promote(
            PromoteError::NotUpToDate { .. }
            | PromoteError::ForcedRecord
            | PromoteError::SyncTarget
            | PromoteError::CacheLost
            | PromoteError::Outdated,
        ) => ErrorCode::Outdated,
        VolumeError::Promote(PromoteError::NoQuorum(_))
        | VolumeError::Io(crate::engine::IoFailure::NoQuorum) => ErrorCode::NoQuorum,
        VolumeError::Demote(_) => ErrorCode::Busy,
        VolumeError::Detached => ErrorCode::NotAttached,
        _ => ErrorCode::Failed,
    };
    err(code, e.to_string())
}

impl ControlHandler for Daemon {
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            match req {
                Request::Attach { volume } => self.attach(&volume).await,
                Request::Detach { volume, force } => self.detach(&volume, force).await,
                Request::Primary { volume, force } => match self.volume(&volume) {
                    // The hook returns once applications can use the device.
                    Some(h) => match h.promote(force).await {
                        Ok(()) => match self.exported(&volume).await {
                            Ok(endpoint) => Response::Ok {
                                message: format!(
                                    "{volume} is primary on {}, exported at {endpoint}",
                                    self.cfg.node
                                ),
                            },
                            Err(why) => err(
                                ErrorCode::Failed,
                                format!("{volume} is primary on {}, but {why}", self.cfg.node),
                            ),
                        },
                        Err(e) => volume_err(e),
                    },
                    None => not_attached(&volume),
                },
                Request::Secondary { volume, force } => match self.volume(&volume) {
                    Some(h) => match self.step_down(&volume, force, || h.demote()).await {
                        Ok(()) => Response::Ok {
                            message: format!("{volume} is secondary on {}", self.cfg.node),
                        },
                        Err(response) => response,
                    },
                    None => not_attached(&volume),
                },
                Request::Status { volume } => self.status(volume.as_deref()).await,
                Request::Verify { volume } => match self.volume(&volume) {
                    Some(h) => match h.verify().await {
                        Ok(()) => Response::Ok {
                            message: format!("verify of {volume} started"),
                        },
                        Err(e) => volume_err(e),
                    },
                    None => not_attached(&volume),
                },
                Request::Resync { volume, checksum } => match self.volume(&volume) {
                    Some(h) => match h.resync(checksum).await {
                        Ok(true) => Response::Ok {
                            message: format!("resync of {volume} started"),
                        },
                        Ok(false) => Response::Ok {
                            message: format!("{volume}: nothing is marked out of sync"),
                        },
                        Err(e) => volume_err(e),
                    },
                    None => not_attached(&volume),
                },
                Request::Resolve { volume } => match self.volume(&volume) {
                    Some(h) => match h.discard_local().await {
                        Ok(()) => Response::Ok {
                            message: format!(
                                "{volume}: local changes discarded on {}; the peer resyncs it in full",
                                self.cfg.node
                            ),
                        },
                        Err(e) => volume_err(e),
                    },
                    None => not_attached(&volume),
                },
                Request::FailDisk { volume } => match self.fault_plan(&volume) {
                    Ok(p) => {
                        p.fail_all.store(true, std::sync::atomic::Ordering::Relaxed);
                        Response::Ok {
                            message: format!("local disk of {volume} now fails every I/O"),
                        }
                    }
                    Err(e) => e,
                },
                Request::TearWrite { volume } => match self.fault_plan(&volume) {
                    Ok(p) => {
                        p.tear_next_write_and_hang
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        Response::Ok {
                            message: format!("the next write of {volume} is torn and hangs"),
                        }
                    }
                    Err(e) => e,
                },
                Request::PowerCut { seed } => self.power_cut(seed),
                Request::SlowDisk { volume, delay_ms } => match self.fault_plan(&volume) {
                    Ok(p) => {
                        p.write_delay_ms
                            .store(delay_ms, std::sync::atomic::Ordering::Relaxed);
                        Response::Ok {
                            message: format!(
                                "local writes of {volume} now wait {delay_ms} ms first"
                            ),
                        }
                    }
                    Err(e) => e,
                },
            }
        })
    }
}

/// Heartbeats to the witness every quarter lease: renews the primary leases
/// and brings every attached volume its record.
async fn heartbeat_loop(me: Weak<Daemon>, witness: Arc<WitnessClient>, lease_ms: u64) {
    let mut interval_ms = LeaseSettings {
        lease_ms,
        ..Default::default()
    }
    .renew_interval_ms();
    // Per volume, the witness's refusal last logged (logged when it changes).
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let Some(daemon) = me.upgrade() else { return };
        let volumes: Vec<(String, String, VolumeHandle)> = daemon
            .volumes
            .lock()
            .map(|v| {
                v.iter()
                    .map(|(n, a)| (n.clone(), a.peer.clone(), a.handle.clone()))
                    .collect()
            })
            .unwrap_or_default();
        drop(daemon);
        let claims: Vec<Claim> = volumes
            .iter()
            .filter_map(|(name, peer, h)| {
                let (view, primary_now) = h.lease()?.claim();
                Some(Claim {
                    volume: name.clone(),
                    peer: peer.clone(),
                    view,
                    primary_now,
                })
            })
            .collect();
        let handles: BTreeMap<&str, &VolumeHandle> =
            volumes.iter().map(|(n, _, h)| (n.as_str(), h)).collect();
        // A heartbeat carries a bounded number of claims (its answer must
        // fit in a frame): more volumes go in several, sent at once so
        // that one slow answer does not delay the others' renewals.
        let mut batches = tokio::task::JoinSet::new();
        for batch in crate::witness::protocol::heartbeat_batches(&claims) {
            let w = witness.clone();
            batches.spawn(async move { w.heartbeat(batch).await });
        }
        while let Some(done) = batches.join_next().await {
            let Ok(Ok(reply)) = done else { continue };
            interval_ms = LeaseSettings {
                lease_ms: reply.lease_ms,
                ..Default::default()
            }
            .renew_interval_ms();
            for answer in reply.volumes {
                let Some(h) = handles.get(answer.volume.as_str()) else {
                    continue;
                };
                match &answer.refused {
                    Some(why) => {
                        let why = why.to_string();
                        if refused.get(&answer.volume) != Some(&why) {
                            tracing::warn!(
                                "volume {}: the witness refuses it: {why}",
                                answer.volume
                            );
                            refused.insert(answer.volume.clone(), why);
                        }
                    }
                    None => {
                        refused.remove(&answer.volume);
                    }
                }
                if answer.lease
                    && let Some(l) = h.lease()
                {
                    l.witness_granted(reply.sent_ms, reply.lease_ms);
                }
                if let Some(r) = answer.record {
                    h.witness_record(r);
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
    }
}

impl InboundHandler for Daemon {
    fn connection_changed(&self, peer: &str, conn: Option<Arc<PeerConnection>>) {
        let handles: Vec<VolumeHandle> = self
            .volumes
            .lock()
            .map(|v| {
                v.values()
                    .filter(|a| a.peer == peer)
                    .map(|a| a.handle.clone())
                    .collect()
            })
            .unwrap_or_default();
        for h in handles {
            h.connection_changed(conn.clone());
        }
    }

    fn volume_state(&self, conn: &Arc<PeerConnection>, msg: VolumeStateMsg) {
        let target = self.volumes.lock().ok().and_then(|v| {
            v.get(&msg.volume)
                .filter(|a| a.peer == conn.peer)
                .map(|a| a.handle.clone())
        });
        if let Some(h) = target {
            h.peer_state(conn.id, msg);
        }
    }

    fn request(&self, conn: &Arc<PeerConnection>, volume: &str, req: InboundRequest) {
        let target = self.volumes.lock().ok().and_then(|v| {
            v.get(volume)
                .filter(|a| a.peer == conn.peer)
                .map(|a| a.handle.clone())
        });
        let refused = match target {
            Some(h) => h.replica_request(conn.clone(), req).err(),
            None => Some(req),
        };
        if let Some(req) = refused {
            let c = conn.clone();
            tokio::spawn(async move { c.reply(req.request, libc::EPERM as u32, None).await });
        }
    }
}

/// Where a drill's power cut leaves the boot id the next start sees.
fn fake_boot_id_path(cfg: &Config) -> std::path::PathBuf {
    cfg.run_dir.join("debug-boot-id")
}

/// With fault injection: the boot id a drill's power cut left (so that the
/// restarted daemon sees another boot, as after a real power cut).
fn debug_boot_id(cfg: &Config) -> Option<[u8; 16]> {
    if !cfg.debug.fault_injection {
        return None;
    }
    let text = std::fs::read_to_string(fake_boot_id_path(cfg)).ok()?;
    let v = u128::from_str_radix(text.trim(), 16).ok()?;
    Some(v.to_be_bytes())
}

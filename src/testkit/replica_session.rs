//! The replica side of the link under a scripted peer: the fixture of the
//! `replica_session` fuzz target. A real [`Link`] (QUIC, mutual TLS, on
//! loopback) serves node "beta" with one volume attached secondary on a
//! file (the real shell, engine and io_uring store). The script plays node
//! "alpha" over a real connection: it announces peer states, sends data
//! frames whose fields it chooses (flags, volume index, offset, length,
//! FUA, resync, forward), waits for the node's answers, garbles the stream
//! or drops the connection.
//!
//! Every session starts on a fresh volume, so an input means the same
//! thing each time it runs. At its end the volume is detached and its data
//! area is read back: each 512-byte sector must be zero or hold what a
//! write frame of the session carried for that sector, and only a frame
//! whose whole range lies inside the data area may have carried it
//! ([`ReplicaFixture::run`] says which sector broke the rule).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::engine::{NodeView, Role};
use crate::link::connection::{read_control, read_header};
use crate::link::wire::{self, FLAG_FORWARD, FLAG_FUA, FLAG_RESYNC, Header, Kind};
use crate::link::{
    HelloMsg, InboundHandler, InboundRequest, Link, LinkSettings, PeerConnection, VolumeStateMsg,
};
use crate::meta::DiskState;
use crate::meta::Generations;
use crate::volume::VolumeHandle;

/// The volume's name on both nodes.
pub const VOLUME: &str = "fuzz";
/// Size of the node's disk file (data area plus internal metadata).
pub const DISK_BYTES: u64 = 8 << 20;
/// Steps of a script that are run; the rest of an input is ignored.
pub const STEPS_MAX: usize = 48;
/// Bytes of one encoded step: an opcode and six argument bytes.
pub const STEP_BYTES: usize = 7;
/// The longest the script waits for the node at one `Wait` step (a
/// resync target is ready in milliseconds here).
const WAIT_STEP: Duration = Duration::from_millis(500);
/// The longest a session waits for the node to answer what it was sent.
const SETTLE: Duration = Duration::from_secs(2);
/// The longest the handshake and the node's first state may take.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Sector size of the written-data model.
const SECTOR_BYTES: u64 = 512;
/// The history the scripted peer's copies belong to.
const PEER_HISTORY: u64 = 0x5eed_0001;

/// One step of the scripted peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A VolumeState with the peer view `template` (see [`peer_view`]),
    /// announcing the volume under index `index`.
    Announce {
        /// Which peer view ([`peer_view`]).
        template: u8,
        /// The sender's volume index.
        index: u8,
    },
    /// A VolumeState saying the resync into the node is done (an
    /// up-to-date primary's view and its generations).
    SyncDone {
        /// The sender's volume index.
        index: u8,
    },
    /// A Write frame of `blocks` 4 KiB blocks at sector `sector`.
    Write {
        /// FLAG_* bits (FUA, RESYNC, FORWARD), and [`FROM_END`].
        flags: u8,
        /// Volume index in the frame.
        index: u8,
        /// Offset in 512-byte sectors.
        sector: u16,
        /// 4 KiB blocks of payload, 1 to 4.
        blocks: u8,
    },
    /// A Zeroes frame over `sectors` sectors at sector `sector`.
    Zeroes {
        /// FLAG_* bits, and [`FROM_END`].
        flags: u8,
        /// Volume index in the frame.
        index: u8,
        /// Offset in sectors.
        sector: u16,
        /// Length in sectors.
        sectors: u16,
    },
    /// A Flush frame.
    Flush {
        /// Volume index in the frame.
        index: u8,
    },
    /// A ReadRequest (or a HashRequest) over `sectors` at `sector`.
    Read {
        /// Bit 0: a HashRequest instead of a ReadRequest; and [`FROM_END`].
        mode: u8,
        /// Volume index in the frame.
        index: u8,
        /// Offset in sectors.
        sector: u16,
        /// Length in sectors.
        sectors: u16,
    },
    /// Waits (at most half a second) until the node announces it is ready to
    /// receive a resync (`sync_target`), or (`up_to_date`) that its copy
    /// is UpToDate: a real peer sends resync data only after the first.
    Wait {
        /// Wait for UpToDate instead of `sync_target`.
        up_to_date: bool,
    },
    /// Waits (at most two seconds) until every request sent so far has an
    /// answer.
    Settle,
    /// `len` raw bytes of value `byte` on the stream (a broken frame).
    Garbage {
        /// Bytes sent.
        len: u8,
        /// Their value.
        byte: u8,
    },
    /// Closes the connection; the rest of the script is not run.
    Disconnect,
}

/// In a step's flags: `sector` counts back from the end of the data area
/// (so that a script reaches its edge whatever the metadata takes).
pub const FROM_END: u8 = 0x80;

/// Opcodes of [`Step`] in the encoding (the first byte of a step, modulo
/// their number).
const OPCODES: u8 = 10;

impl Step {
    /// The step's seven bytes.
    pub fn encode(&self) -> [u8; STEP_BYTES] {
        let u16le = |v: u16| v.to_le_bytes();
        let (op, a): (u8, [u8; 6]) = match *self {
            Step::Announce { template, index } => (0, [template, index, 0, 0, 0, 0]),
            Step::SyncDone { index } => (1, [index, 0, 0, 0, 0, 0]),
            Step::Write {
                flags,
                index,
                sector,
                blocks,
            } => {
                let s = u16le(sector);
                (2, [flags, index, s[0], s[1], blocks.saturating_sub(1), 0])
            }
            Step::Zeroes {
                flags,
                index,
                sector,
                sectors,
            } => {
                let (s, n) = (u16le(sector), u16le(sectors));
                (3, [flags, index, s[0], s[1], n[0], n[1]])
            }
            Step::Flush { index } => (4, [index, 0, 0, 0, 0, 0]),
            Step::Read {
                mode,
                index,
                sector,
                sectors,
            } => {
                let (s, n) = (u16le(sector), u16le(sectors));
                (5, [mode, index, s[0], s[1], n[0], n[1]])
            }
            Step::Wait { up_to_date } => (6, [u8::from(up_to_date), 0, 0, 0, 0, 0]),
            Step::Settle => (7, [0; 6]),
            Step::Garbage { len, byte } => (8, [len, byte, 0, 0, 0, 0]),
            Step::Disconnect => (9, [0; 6]),
        };
        [op, a[0], a[1], a[2], a[3], a[4], a[5]]
    }

    /// The step seven bytes stand for (any bytes are a step; a short last
    /// step is padded with zeros).
    pub fn decode(b: &[u8]) -> Step {
        let at = |i: usize| b.get(i).copied().unwrap_or(0);
        let u16_at = |i: usize| u16::from_le_bytes([at(i), at(i + 1)]);
        match at(0) % OPCODES {
            0 => Step::Announce {
                template: at(1),
                index: at(2),
            },
            1 => Step::SyncDone { index: at(1) },
            2 => Step::Write {
                flags: at(1),
                index: at(2),
                sector: u16_at(3),
                blocks: 1 + at(5) % 4,
            },
            3 => Step::Zeroes {
                flags: at(1),
                index: at(2),
                sector: u16_at(3),
                sectors: u16_at(5),
            },
            4 => Step::Flush { index: at(1) },
            5 => Step::Read {
                mode: at(1) & (1 | FROM_END),
                index: at(2),
                sector: u16_at(3),
                sectors: u16_at(5),
            },
            6 => Step::Wait {
                up_to_date: at(1) & 1 != 0,
            },
            7 => Step::Settle,
            8 => Step::Garbage {
                len: at(1),
                byte: at(2),
            },
            _ => Step::Disconnect,
        }
    }
}

/// A script as fuzz input bytes.
pub fn encode_script(steps: &[Step]) -> Vec<u8> {
    steps.iter().flat_map(Step::encode).collect()
}

/// The steps fuzz input bytes stand for (at most [`STEPS_MAX`]).
pub fn decode_script(input: &[u8]) -> Vec<Step> {
    input
        .chunks(STEP_BYTES)
        .take(STEPS_MAX)
        .map(Step::decode)
        .collect()
}

/// The peer views a script can announce, by `template` modulo their
/// number: an up-to-date primary (the node becomes its sync target), an
/// up-to-date secondary, a primary and a secondary with no data asking the
/// node to be their source, an outdated secondary, a detached volume
/// (None), an up-to-date primary of another size, and an up-to-date
/// primary that lost power.
pub fn peer_view(template: u8, node: &NodeView) -> Option<NodeView> {
    let up_to_date = |role| NodeView {
        role,
        disk: DiskState::UpToDate,
        generations: Generations {
            current: PEER_HISTORY,
            ..Default::default()
        },
        data_bytes: node.data_bytes,
        chunk_bytes: node.chunk_bytes,
        dirty_chunks: 0,
        sync_target: false,
        full_sync_base: 0,
        record: Default::default(),
        cache_lost: false,
        volatile_cache: true,
    };
    let empty = |role| NodeView {
        disk: DiskState::Inconsistent,
        generations: Generations::default(),
        sync_target: true,
        ..up_to_date(role)
    };
    Some(match template % 8 {
        0 => up_to_date(Role::Primary),
        1 => up_to_date(Role::Secondary),
        2 => empty(Role::Primary),
        3 => NodeView {
            disk: DiskState::Outdated,
            ..up_to_date(Role::Secondary)
        },
        4 => return None,
        5 => NodeView {
            data_bytes: node.data_bytes + 4096,
            ..up_to_date(Role::Primary)
        },
        6 => NodeView {
            cache_lost: true,
            ..up_to_date(Role::Primary)
        },
        _ => empty(Role::Secondary),
    })
}

/// Scripts that reach the replica path's main cases: a full resync into
/// the node (in range, straddling the end, past it, unaligned), mirrored
/// writes once in sync, forwarded writes, zeroing, reads and digests,
/// flushes, a garbled stream, a disconnect in the middle, and states that
/// must be refused.
pub fn seed_scripts() -> Vec<(&'static str, Vec<Step>)> {
    let w = |flags: u16, sector, blocks| Step::Write {
        flags: flags as u8,
        index: 3,
        sector,
        blocks,
    };
    let w1 = |flags: u16, sector| Step::Write {
        flags: flags as u8,
        index: 1,
        sector,
        blocks: 1,
    };
    let sync = vec![
        Step::Announce {
            template: 0,
            index: 3,
        },
        Step::Wait { up_to_date: false },
    ];
    let then = |rest: Vec<Step>| [sync.clone(), rest].concat();
    let end = FROM_END as u16;
    vec![
        (
            "resync",
            then(vec![
                w(FLAG_RESYNC, 0, 4),
                w(FLAG_RESYNC | FLAG_FUA, 64, 1),
                Step::Zeroes {
                    flags: FLAG_RESYNC as u8,
                    index: 3,
                    sector: 128,
                    sectors: 16,
                },
                Step::Flush { index: 3 },
                Step::Settle,
                Step::SyncDone { index: 3 },
                Step::Wait { up_to_date: true },
                w(0, 256, 2),
                w(FLAG_FUA, 512, 1),
                w(FLAG_FUA | end, 8, 1),
                Step::Read {
                    mode: 1,
                    index: 3,
                    sector: 0,
                    sectors: 8,
                },
                Step::Read {
                    mode: 0,
                    index: 3,
                    sector: 0,
                    sectors: 8,
                },
                Step::Settle,
            ]),
        ),
        (
            "out-of-range",
            then(vec![
                w(FLAG_RESYNC, 1, 1),
                // Straddling the end, at it, past it.
                w(FLAG_RESYNC | end, 8, 2),
                w(FLAG_RESYNC | end, 0, 1),
                w(FLAG_RESYNC, u16::MAX, 4),
                Step::Zeroes {
                    flags: FLAG_RESYNC as u8 | FROM_END,
                    index: 3,
                    sector: 0,
                    sectors: 16,
                },
                Step::Read {
                    mode: 1,
                    index: 3,
                    sector: 3,
                    sectors: 8,
                },
                Step::Read {
                    mode: FROM_END,
                    index: 3,
                    sector: 8,
                    sectors: 16,
                },
                Step::Settle,
            ]),
        ),
        (
            "unannounced-index",
            then(vec![w(FLAG_RESYNC, 0, 1), {
                Step::Write {
                    flags: FLAG_RESYNC as u8,
                    index: 9,
                    sector: 8,
                    blocks: 1,
                }
            }]),
        ),
        (
            "forwarded",
            then(vec![
                w(FLAG_FORWARD, 32, 1),
                Step::SyncDone { index: 3 },
                Step::Wait { up_to_date: true },
                Step::Announce {
                    template: 2,
                    index: 3,
                },
                w(FLAG_FORWARD | FLAG_FUA, 40, 1),
                Step::Settle,
            ]),
        ),
        (
            "refused-states",
            vec![
                Step::Announce {
                    template: 7,
                    index: 1,
                },
                w1(FLAG_RESYNC, 8),
                Step::Announce {
                    template: 4,
                    index: 1,
                },
                Step::Announce {
                    template: 5,
                    index: 1,
                },
                w1(0, 16),
                Step::Settle,
            ],
        ),
        (
            "garbled",
            then(vec![
                w(FLAG_RESYNC, 0, 1),
                Step::Garbage {
                    len: 40,
                    byte: 0xab,
                },
                w(FLAG_RESYNC, 8, 1),
            ]),
        ),
        (
            "disconnect",
            then(vec![
                w(FLAG_RESYNC, 0, 2),
                w(FLAG_RESYNC | FLAG_FUA, 16, 2),
                Step::Disconnect,
                w(FLAG_RESYNC, 32, 1),
            ]),
        ),
    ]
}

/// What a session did, for the fixture's own test.
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    /// Data frames sent (Write, Zeroes, Flush, reads).
    pub frames_sent: u64,
    /// Of those, answered with status 0.
    pub frames_accepted: u64,
    /// Sectors of the data area that are not zero at the end.
    pub sectors_written: u64,
    /// The node's disk state when the session ended.
    pub final_disk: Option<DiskState>,
}

/// A sector a session's disk holds that no valid frame carried.
#[derive(Debug, thiserror::Error)]
#[error(
    "sector {sector} (byte {}) holds data no valid write frame of the session carried there",
    sector * SECTOR_BYTES
)]
pub struct StrayWrite {
    /// The sector.
    pub sector: u64,
}

/// The node "beta", its link, and the scripted peer's endpoint.
pub struct ReplicaFixture {
    dir: PathBuf,
    link: Arc<Link>,
    node: Arc<OneVolume>,
    client: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    node_addr: SocketAddr,
    settings: LinkSettings,
}

/// The node's inbound handler: its only volume, when one is attached.
struct OneVolume {
    volume: Mutex<Option<VolumeHandle>>,
}

impl OneVolume {
    fn current(&self) -> Option<VolumeHandle> {
        self.volume.lock().ok().and_then(|v| v.clone())
    }
}

impl InboundHandler for OneVolume {
    fn connection_changed(&self, _peer: &str, conn: Option<Arc<PeerConnection>>) {
        if let Some(v) = self.current() {
            v.connection_changed(conn);
        }
    }

    fn volume_state(&self, conn: &Arc<PeerConnection>, msg: VolumeStateMsg) {
        if let Some(v) = self.current().filter(|_| msg.volume == VOLUME) {
            v.peer_state(conn.id, msg);
        }
    }

    fn request(&self, conn: &Arc<PeerConnection>, volume: &str, req: InboundRequest) {
        let refused = match self.current().filter(|_| volume == VOLUME) {
            Some(v) => v.replica_request(conn.clone(), req).err(),
            None => Some(req),
        };
        if let Some(req) = refused {
            let c = conn.clone();
            tokio::spawn(async move { c.reply(req.request, libc::EPERM as u32, None).await });
        }
    }
}

/// What the reader of the node's frames saw.
#[derive(Default)]
struct Answers {
    outstanding: HashSet<u64>,
    accepted: u64,
}

impl ReplicaFixture {
    /// Certificates for alpha and beta under `dir` (created), beta's link
    /// on an ephemeral loopback port, and alpha's client endpoint. Call
    /// within a tokio runtime.
    pub fn start(dir: &Path) -> Result<Self, String> {
        let s = |e: &dyn std::fmt::Display| e.to_string();
        std::fs::create_dir_all(dir).map_err(|e| s(&e))?;
        let tls_dir = dir.join("tls");
        if !tls_dir.join("beta.pem").exists() {
            std::fs::create_dir_all(&tls_dir).map_err(|e| s(&e))?;
            crate::cert::create_ca(&tls_dir).map_err(|e| s(&e))?;
            for n in ["alpha", "beta"] {
                crate::cert::issue(n, &tls_dir, &tls_dir, 30).map_err(|e| s(&e))?;
            }
        }
        let tls = |n: &str| {
            let (cert, key) = crate::cert::node_paths(&tls_dir, n);
            crate::link::tls::TlsMaterial::load(&crate::cert::ca_paths(&tls_dir).0, &cert, &key)
                .map_err(|e| s(&e))
        };
        let settings = LinkSettings::from(&crate::config::LinkConfig::default());
        let node = Arc::new(OneVolume {
            volume: Mutex::new(None),
        });
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        // (beta never dials alpha, the lower name: the address is unused.)
        let link = Link::start(
            "beta",
            loopback(0),
            &[("alpha".to_string(), loopback(9))],
            &tls("beta")?,
            settings.clone(),
            node.clone(),
        )
        .map_err(|e| s(&e))?;
        let node_addr = link.local_addr().map_err(|e| s(&e))?;
        let crypto = tls("alpha")?
            .quic_client(crate::link::tls::ALPN)
            .map_err(|e| s(&e))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(Arc::new(crate::link::transport_config(&settings)));
        let client = quinn::Endpoint::client(loopback(0)).map_err(|e| s(&e))?;
        Ok(ReplicaFixture {
            dir: dir.to_path_buf(),
            link,
            node,
            client,
            client_config,
            node_addr,
            settings,
        })
    }

    /// Runs `steps` against a fresh volume and checks its data area
    /// afterwards. Err: the node wrote a sector no valid frame carried
    /// there. A panic: the fixture itself failed, or the node stopped
    /// answering (a hang the fuzzer should report).
    pub async fn run(&self, steps: &[Step]) -> Result<SessionReport, StrayWrite> {
        let disk = self.dir.join("beta.img");
        let volume =
            super::standalone::secondary_on_file(&disk, VOLUME, DISK_BYTES, "beta", "alpha")
                .await
                .expect("a fresh secondary volume");
        if let Ok(mut v) = self.node.volume.lock() {
            *v = Some(volume.clone());
        }
        let mut allowed = HashSet::new();
        let mut report = self.session(steps, &mut allowed).await;
        report.final_disk = volume.status().await.ok().map(|s| s.engine.disk);
        volume
            .detach()
            .await
            .expect("a secondary detaches after any session");
        if let Ok(mut v) = self.node.volume.lock() {
            *v = None;
        }
        let data_bytes = volume.size_bytes();
        let bytes = std::fs::read(&disk).expect("the node's disk");
        for (sector, content) in bytes[..data_bytes as usize]
            .chunks(SECTOR_BYTES as usize)
            .enumerate()
        {
            if content.iter().all(|&b| b == 0) {
                continue;
            }
            report.sectors_written += 1;
            if !allowed.contains(&(sector as u64, crc32fast::hash(content))) {
                return Err(StrayWrite {
                    sector: sector as u64,
                });
            }
        }
        Ok(report)
    }

    /// One connection as alpha, running the script; `allowed` gathers
    /// (sector, CRC) of every sector a valid write frame carried.
    async fn session(&self, steps: &[Step], allowed: &mut HashSet<(u64, u32)>) -> SessionReport {
        let mut report = SessionReport::default();
        let quic = tokio::time::timeout(HANDSHAKE, async {
            self.client
                .connect_with(self.client_config.clone(), self.node_addr, "beta")
                .expect("a connection attempt")
                .await
        })
        .await
        .expect("the node answers the handshake in time")
        .expect("the node accepts alpha's certificate");
        let (mut send, mut recv) = quic.open_bi().await.expect("a stream");
        let hello = HelloMsg {
            node: "alpha".into(),
            protocol: wire::PROTOCOL_VERSION,
            lease_ms: Some(self.settings.lease_ms),
            inflight_requests_max: Some(self.settings.inflight_requests_max as u64),
        };
        let hello = serde_json::to_vec(&hello).expect("hello json");
        send.write_all(&Header::new(Kind::Hello).encode(&hello))
            .await
            .expect("send hello");
        send.write_all(&hello).await.expect("send hello");
        tokio::time::timeout(HANDSHAKE, read_control(&mut recv, Kind::Hello))
            .await
            .expect("the node's hello in time")
            .expect("the node's hello");

        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
        let writer = tokio::spawn(async move {
            while let Some(bytes) = out_rx.recv().await {
                if send.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let (state_tx, mut state) = watch::channel(None::<NodeView>);
        let answers = Arc::new(Mutex::new(Answers::default()));
        let reader = tokio::spawn(read_node(recv, out.clone(), state_tx, answers.clone()));
        let node_view = tokio::time::timeout(HANDSHAKE, state.wait_for(Option::is_some))
            .await
            .expect("the node announces its volume in time")
            .ok()
            .and_then(|v| *v)
            .expect("the node's view");

        let data_bytes = node_view.data_bytes;
        let mut request = 0u64;
        let mut writes = 0u64;
        for step in steps {
            let (mut h, payload) = match *step {
                Step::Announce { template, index } => {
                    let view = peer_view(template, &node_view);
                    let _ = out.send(state_frame(index, view, None)).await;
                    continue;
                }
                Step::SyncDone { index } => {
                    let view = peer_view(0, &node_view);
                    let done = view.as_ref().map(|v| v.generations);
                    let _ = out.send(state_frame(index, view, done)).await;
                    continue;
                }
                Step::Wait { up_to_date } => {
                    let ready = |v: &Option<NodeView>| {
                        v.as_ref().is_some_and(|v| {
                            if up_to_date {
                                v.disk == DiskState::UpToDate
                            } else {
                                v.sync_target
                            }
                        })
                    };
                    let _ = tokio::time::timeout(WAIT_STEP, state.wait_for(ready)).await;
                    continue;
                }
                Step::Settle => {
                    settle(&answers, &quic).await;
                    continue;
                }
                Step::Garbage { len, byte } => {
                    let _ = out.send(vec![byte; usize::from(len)]).await;
                    continue;
                }
                Step::Disconnect => break,
                Step::Write {
                    flags,
                    index,
                    sector,
                    blocks,
                } => {
                    let offset = offset_of(flags, sector, data_bytes);
                    let len = u64::from(blocks) * 4096;
                    writes += 1;
                    let payload = write_payload(writes, len);
                    // (The node takes only 4 KiB-aligned ranges: a looser
                    // model still catches any write outside the area.)
                    if offset + len <= data_bytes {
                        for (k, s) in payload.chunks(SECTOR_BYTES as usize).enumerate() {
                            allowed.insert((offset / SECTOR_BYTES + k as u64, crc32fast::hash(s)));
                        }
                    }
                    (data_frame(Kind::Write, flags, index, offset, 0), payload)
                }
                Step::Zeroes {
                    flags,
                    index,
                    sector,
                    sectors,
                } => (
                    data_frame(
                        Kind::Zeroes,
                        flags,
                        index,
                        offset_of(flags, sector, data_bytes),
                        u32::from(sectors) * SECTOR_BYTES as u32,
                    ),
                    Vec::new(),
                ),
                Step::Flush { index } => (data_frame(Kind::Flush, 0, index, 0, 0), Vec::new()),
                Step::Read {
                    mode,
                    index,
                    sector,
                    sectors,
                } => (
                    data_frame(
                        if mode & 1 != 0 {
                            Kind::HashRequest
                        } else {
                            Kind::ReadRequest
                        },
                        0,
                        index,
                        offset_of(mode, sector, data_bytes),
                        u32::from(sectors) * SECTOR_BYTES as u32,
                    ),
                    Vec::new(),
                ),
            };
            // Every data frame: its own request id, awaited by `settle`.
            request += 1;
            h.request = request;
            report.frames_sent += 1;
            remember(&answers, request);
            let mut frame = h.encode(&payload).to_vec();
            frame.extend_from_slice(&payload);
            let _ = out.send(frame).await;
        }
        settle(&answers, &quic).await;
        quic.close(
            crate::link::connection::CLOSE_SHUTDOWN.into(),
            b"script done",
        );
        drop(out);
        let _ = writer.await;
        let _ = reader.await;
        report.frames_accepted = answers.lock().map(|a| a.accepted).unwrap_or(0);
        // The node has seen the connection go before the volume detaches.
        let gone = tokio::time::timeout(SETTLE, async {
            while self.link.connection("alpha").is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "the node kept a closed connection");
        report
    }
}

impl Drop for ReplicaFixture {
    fn drop(&mut self) {
        self.link.shutdown();
    }
}

/// Reads the node's frames until the connection ends: keeps its latest
/// view, counts answers to the script's requests, grants the leases it
/// asks for, and acknowledges what it sends as a sync source.
async fn read_node(
    mut recv: quinn::RecvStream,
    out: mpsc::Sender<Vec<u8>>,
    state: watch::Sender<Option<NodeView>>,
    answers: Arc<Mutex<Answers>>,
) {
    while let Ok(h) = read_header(&mut recv).await {
        let mut payload = vec![0u8; h.payload_len as usize];
        if recv.read_exact(&mut payload).await.is_err() {
            break;
        }
        let answer = |kind: Kind, status: u32| {
            let mut a = Header::new(kind);
            a.request = h.request;
            a.status = status;
            a.encode(&[]).to_vec()
        };
        match h.kind {
            Kind::VolumeState => {
                if let Ok(m) = serde_json::from_slice::<VolumeStateMsg>(&payload)
                    && m.volume == VOLUME
                {
                    state.send_replace(m.view);
                }
            }
            Kind::LeasePing => {
                let _ = out.send(answer(Kind::LeasePong, 0)).await;
            }
            Kind::Ack | Kind::ReadReply | Kind::HashReply => {
                if let Ok(mut a) = answers.lock()
                    && a.outstanding.remove(&h.request)
                    && h.status == 0
                {
                    a.accepted += 1;
                }
            }
            Kind::Write | Kind::Zeroes | Kind::Flush => {
                let _ = out.send(answer(Kind::Ack, 0)).await;
            }
            Kind::ReadRequest | Kind::HashRequest => {
                let _ = out.send(answer(Kind::Ack, libc::EIO as u32)).await;
            }
            Kind::Hello | Kind::LeasePong => {}
        }
    }
}

fn remember(answers: &Mutex<Answers>, request: u64) {
    if let Ok(mut a) = answers.lock() {
        a.outstanding.insert(request);
    }
}

/// Waits until every request has its answer or the connection is gone.
async fn settle(answers: &Mutex<Answers>, quic: &quinn::Connection) {
    let _ = tokio::time::timeout(SETTLE, async {
        while quic.close_reason().is_none()
            && answers.lock().is_ok_and(|a| !a.outstanding.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// A step's byte offset: `sector` sectors from the start of the data
/// area, or back from its end with [`FROM_END`].
fn offset_of(flags: u8, sector: u16, data_bytes: u64) -> u64 {
    let bytes = u64::from(sector) * SECTOR_BYTES;
    if flags & FROM_END != 0 {
        data_bytes.saturating_sub(bytes)
    } else {
        bytes
    }
}

fn data_frame(kind: Kind, flags: u8, index: u8, offset: u64, op_len: u32) -> Header {
    let mut h = Header::new(kind);
    h.flags = u16::from(flags) & (FLAG_FUA | FLAG_RESYNC | FLAG_FORWARD);
    h.volume = u32::from(index);
    h.offset = offset;
    h.op_len = op_len;
    h
}

fn state_frame(
    index: u8,
    view: Option<NodeView>,
    sync_done: Option<crate::meta::Generations>,
) -> Vec<u8> {
    let msg = VolumeStateMsg {
        volume: VOLUME.into(),
        index: u32::from(index),
        view,
        sync_done,
        dirty_runs: None,
    };
    let json = serde_json::to_vec(&msg).expect("state json");
    let mut frame = Header::new(Kind::VolumeState).encode(&json).to_vec();
    frame.extend_from_slice(&json);
    frame
}

/// The payload of the session's `write`th write: every sector says which
/// write and which sector of it it is, so no two sectors are alike.
fn write_payload(write: u64, len: u64) -> Vec<u8> {
    let mut p = vec![0xa5u8; len as usize];
    for (k, s) in p.chunks_mut(SECTOR_BYTES as usize).enumerate() {
        s[..8].copy_from_slice(&write.to_le_bytes());
        s[8..16].copy_from_slice(&(k as u64).to_le_bytes());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_decodes_to_itself() {
        for (_, script) in seed_scripts() {
            assert_eq!(decode_script(&encode_script(&script)), script);
        }
        // Any bytes are a script.
        let junk: Vec<u8> = (0..=255u8).collect();
        assert_eq!(decode_script(&junk).len(), 256usize.div_ceil(STEP_BYTES));
    }

    #[test]
    fn the_seed_scripts_reach_the_replica_path_and_wind_down() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir =
            std::env::temp_dir().join(format!("blkrep-replica-session-{}", std::process::id()));
        runtime.block_on(async {
            let f = ReplicaFixture::start(&dir).expect("fixture");
            for (name, script) in seed_scripts() {
                let r = f
                    .run(&script)
                    .await
                    .unwrap_or_else(|e| panic!("seed {name}: {e}"));
                eprintln!("seed {name}: {r:?}");
                match name {
                    // 4 + 1 resync blocks (the zeroed ones stay zero), then
                    // 2 + 1 + 1 mirrored ones (the last one ends the area).
                    "resync" => {
                        assert_eq!(r.sectors_written, (4 + 1 + 2 + 1 + 1) * 8, "{name}");
                        assert_eq!(r.final_disk, Some(DiskState::UpToDate), "{name}");
                        assert_eq!(r.frames_accepted, r.frames_sent, "{name}");
                    }
                    // Only the aligned, in-range write lands.
                    "out-of-range" => assert_eq!(r.frames_accepted, 0, "{name}"),
                    "forwarded" => assert_eq!(r.sectors_written, 8, "{name}"),
                    "refused-states" => {
                        assert_eq!(r.sectors_written, 0, "{name}");
                        assert_eq!(r.frames_accepted, 0, "{name}");
                    }
                    _ => assert!(r.frames_sent > 0, "{name}"),
                }
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! A UDP forwarder that can silently drop everything, drop a share of the
//! packets, delay them, or replay each one again later: a partition, a
//! lossy, slow or replaying network path without root (the realistic kind:
//! packets vanish, arrive late or twice, nothing reports an error). One client per proxy, which is how the cluster uses it
//! (one dialing endpoint per path).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::rng::SplitMix64;

/// What the path does to packets right now.
#[derive(Default)]
struct Faults {
    cut: AtomicBool,
    /// Drops only what the client sends (a one-way partition: the client
    /// still hears the target).
    cut_from_client: AtomicBool,
    loss_permille: AtomicU64,
    delay_us: AtomicU64,
    /// 0: off; else every packet is sent once more this much later.
    replay_after_us: AtomicU64,
    /// Packets queued for a replay so far.
    replayed: AtomicU64,
}

/// A running forwarder.
pub struct UdpProxy {
    /// Where clients send to.
    pub listen: SocketAddr,
    faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
}

/// One direction: receives on `from`, sends with `out` to `to()`, through a
/// delay line.
fn pump(
    from: UdpSocket,
    out: UdpSocket,
    to: impl Fn(SocketAddr) -> Option<SocketAddr> + Send + 'static,
    from_client: bool,
    faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let tx = delay_line(out.try_clone(), stop.clone());
    let replay = delay_line(out.try_clone(), stop.clone());
    std::thread::spawn(move || {
        let mut rng = SplitMix64(seed);
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, src)) = from.recv_from(&mut buf) else {
                continue;
            };
            let Some(dest) = to(src) else { continue };
            if faults.cut.load(Ordering::Relaxed)
                || (from_client && faults.cut_from_client.load(Ordering::Relaxed))
                || rng.next_u64() % 1000 < faults.loss_permille.load(Ordering::Relaxed)
            {
                continue;
            }
            let delay = Duration::from_micros(faults.delay_us.load(Ordering::Relaxed));
            let _ = tx.send((Instant::now() + delay, buf[..n].to_vec(), dest));
            let again = faults.replay_after_us.load(Ordering::Relaxed);
            if again > 0 {
                let at = Instant::now() + Duration::from_micros(again);
                if replay.send((at, buf[..n].to_vec(), dest)).is_ok() {
                    faults.replayed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
}

/// A thread that sends each queued datagram at its time (in queue order).
fn delay_line(
    out: std::io::Result<UdpSocket>,
    stop: Arc<AtomicBool>,
) -> mpsc::Sender<(Instant, Vec<u8>, SocketAddr)> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>, SocketAddr)>();
    let Ok(out) = out else {
        return tx;
    };
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((at, bytes, dest)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let _ = out.send_to(&bytes, dest);
        }
    });
    tx
}

impl UdpProxy {
    /// Forwards datagrams sent to a fresh port on `listen_ip` to `target`
    /// and the answers back.
    pub fn start(listen_ip: [u8; 4], target: SocketAddr) -> std::io::Result<Self> {
        let front = UdpSocket::bind(SocketAddr::from((listen_ip, 0)))?;
        let back = UdpSocket::bind(SocketAddr::from((listen_ip, 0)))?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        let listen = front.local_addr()?;
        let faults = Arc::new(Faults::default());
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let seen = client.clone();
        pump(
            front.try_clone()?,
            back.try_clone()?,
            move |src| {
                if let Ok(mut c) = seen.lock() {
                    *c = Some(src);
                }
                Some(target)
            },
            true,
            faults.clone(),
            stop.clone(),
            u64::from(listen.port()),
        );
        pump(
            back,
            front,
            move |_| client.lock().ok().and_then(|c| *c),
            false,
            faults.clone(),
            stop.clone(),
            u64::from(listen.port()) << 16,
        );
        Ok(UdpProxy {
            listen,
            faults,
            stop,
        })
    }

    /// Drops (true) or forwards (false) everything from now on.
    pub fn set_cut(&self, cut: bool) {
        self.faults.cut.store(cut, Ordering::Relaxed);
    }

    /// Drops (true) or forwards (false) what the client sends from now on;
    /// the client keeps hearing the target.
    pub fn set_cut_from_client(&self, cut: bool) {
        self.faults.cut_from_client.store(cut, Ordering::Relaxed);
    }

    /// Whether the path is cut.
    pub fn is_cut(&self) -> bool {
        self.faults.cut.load(Ordering::Relaxed)
    }

    /// Drops this share of the packets (per mille), in both directions.
    pub fn set_loss_permille(&self, permille: u64) {
        self.faults
            .loss_permille
            .store(permille.min(1000), Ordering::Relaxed);
    }

    /// Delays every packet by this much, in both directions.
    pub fn set_delay(&self, delay: Duration) {
        self.faults
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Packets replayed so far.
    pub fn replayed(&self) -> u64 {
        self.faults.replayed.load(Ordering::Relaxed)
    }

    /// Sends every packet once more `after` it was forwarded (zero: off),
    /// in both directions: a replaying network or attacker.
    pub fn set_replay(&self, after: Duration) {
        self.faults
            .replay_after_us
            .store(after.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

//! A UDP forwarder that can silently drop everything: a partition of one
//! network path without root (the realistic kind: packets vanish, nothing
//! reports an error). One client per proxy, which is how the cluster uses
//! it (one dialing endpoint per path).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running forwarder.
pub struct UdpProxy {
    /// Where clients send to.
    pub listen: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
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
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (front2, back2) = (front.try_clone()?, back.try_clone()?);
        {
            let (cut, stop, client) = (cut.clone(), stop.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        if let Ok(mut c) = client.lock() {
                            *c = Some(from);
                        }
                        if !cut.load(Ordering::Relaxed) {
                            let _ = back.send_to(&buf[..n], target);
                        }
                    }
                }
            });
        }
        {
            let (cut, stop) = (cut.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = back2.recv_from(&mut buf)
                        && !cut.load(Ordering::Relaxed)
                        && let Some(to) = client.lock().ok().and_then(|c| *c)
                    {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            });
        }
        Ok(UdpProxy { listen, cut, stop })
    }

    /// Drops (true) or forwards (false) everything from now on.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Whether the path is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

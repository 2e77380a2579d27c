//! Shared helpers for the integration tests: real daemons on loopback.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkrep::testkit::cluster::{ClusterOptions, LocalCluster, scratch_dir};

/// The blkrep binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_blkrep"))
}

/// A created (not started) cluster with a small volume.
pub fn cluster(tag: &str, opts: ClusterOptions) -> LocalCluster {
    LocalCluster::create(bin(), &scratch_dir(tag), opts).expect("create cluster")
}

/// Small volumes keep the initial full sync short.
pub fn small() -> ClusterOptions {
    ClusterOptions {
        disk_bytes: 16 << 20,
        ..Default::default()
    }
}

/// Starts both daemons, attaches, makes alpha primary, waits for the
/// initial sync.
pub async fn up(tag: &str, opts: ClusterOptions) -> LocalCluster {
    let mut c = cluster(tag, opts);
    if let Err(e) = c.bring_up().await {
        dump_logs(&c);
        panic!("bring up: {e}");
    }
    c
}

/// Prints both daemon logs (on failure).
pub fn dump_logs(c: &LocalCluster) {
    for n in &c.nodes {
        eprintln!("===== {} log =====", n.name);
        eprintln!("{}", std::fs::read_to_string(&n.log).unwrap_or_default());
    }
}

/// The NBD URI of node `i`'s export.
pub fn nbd_uri(c: &LocalCluster, i: usize) -> String {
    format!("nbd+unix:///?socket={}", c.nbd_socket(i).display())
}

/// Runs qemu-io against node `i`'s export with the given commands.
pub fn qemu_io(c: &LocalCluster, i: usize, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(nbd_uri(c, i));
    let out = cmd.output().expect("run qemu-io (install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed: {text}");
    assert!(
        !text.contains("failed"),
        "qemu-io reported a failure: {text}"
    );
    text
}

/// Runs `cmd` to its end, or kills it after `limit` (None then): for
/// commands that hang when the daemon does.
pub async fn output_within(cmd: &mut Command, limit: Duration) -> Option<std::process::Output> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.wait_with_output().ok()
}

/// The daemon of node `i` has a thread blocked in uninterruptible sleep
/// (state D in /proc: waiting in the kernel on a disk).
pub fn daemon_blocked_on_disk(c: &LocalCluster, i: usize) -> bool {
    let Some(pid) = c.pid(i) else { return false };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('D'))
            })
            .unwrap_or(false)
    })
}

/// Both nodes' data areas, byte for byte.
pub async fn assert_replicas_equal(c: &LocalCluster) {
    let size = c.status(0).await.expect("status").size_bytes.expect("size");
    let a = c.read_data(0, size).expect("read alpha");
    let b = c.read_data(1, size).expect("read beta");
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        dump_logs(c);
        panic!("replicas differ; first difference at byte {first}");
    }
}

/// Runs the blkrep CLI against node `i`.
pub fn cli(c: &LocalCluster, i: usize, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("--config")
        .arg(&c.nodes[i].config)
        .args(args)
        .output()
        .expect("run blkrep")
}

/// Generous timeout for conditions in tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Makes node `i` present another certificate and key (its CA stays).
pub fn use_identity(c: &LocalCluster, i: usize, cert: &Path, key: &Path) {
    let tls = c.dir.join("tls");
    let name = &c.nodes[i].name;
    let cfg = std::fs::read_to_string(&c.nodes[i].config).expect("read config");
    let cfg = cfg
        .replace(
            &tls.join(format!("{name}.pem")).display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &tls.join(format!("{name}.key")).display().to_string(),
            &key.display().to_string(),
        );
    std::fs::write(&c.nodes[i].config, cfg).expect("write config");
}

/// Mounts a small ext4 filesystem (a loop device) and undoes it on drop.
pub struct SmallFs {
    /// Where it is mounted.
    pub mountpoint: std::path::PathBuf,
}

impl SmallFs {
    /// Creates and mounts a filesystem of `bytes` under `dir`.
    pub fn new(dir: &Path, bytes: u64) -> Self {
        let image = dir.join("small-fs.img");
        let mountpoint = dir.join("small-fs");
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        let f = std::fs::File::create(&image).expect("fs image");
        f.set_len(bytes).expect("size");
        run("mkfs.ext4", &["-q", "-F", image.to_str().expect("path")]);
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().expect("path"),
                mountpoint.to_str().expect("path"),
            ],
        );
        SmallFs { mountpoint }
    }

    /// Free bytes on it.
    pub fn free_bytes(&self) -> u64 {
        let o = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.mountpoint)
            .output()
            .expect("df");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }

    /// Moves the file at `path` onto this filesystem (kept sparse) and
    /// leaves a symlink to it at `path`.
    pub fn move_in(&self, path: &Path) {
        let name = path.file_name().expect("a file name");
        let moved = self.mountpoint.join(name);
        run(
            "cp",
            &[
                "--sparse=always",
                path.to_str().expect("path"),
                moved.to_str().expect("path"),
            ],
        );
        std::fs::remove_file(path).expect("remove the moved file");
        std::os::unix::fs::symlink(&moved, path).expect("symlink");
    }

    /// Freezes the filesystem (`fsfreeze`): every write to it blocks
    /// until the returned guard is dropped, as on a hung disk; reads go on.
    pub fn freeze(&self) -> Frozen<'_> {
        run("fsfreeze", &["-f", self.mountpoint.to_str().expect("path")]);
        Frozen { fs: self }
    }
}

/// A frozen `SmallFs`; thawed on drop (also when a test fails, so that no
/// process stays blocked in a write).
pub struct Frozen<'a> {
    fs: &'a SmallFs,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.fs.mountpoint)
            .status();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// Runs a command that must succeed.
pub fn run(cmd: &str, args: &[&str]) {
    let o = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

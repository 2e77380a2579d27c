//! The command line as a cluster manager sees it: exit codes, refusals,
//! config errors, create-md safety.

mod common;

use std::process::Command;

use blkrep::control::Request;
use common::*;

/// Runs `cmd` in a detached tmux session (a real terminal, 120x10) and
/// returns its screen once `done` holds on it (or after 5 s).
async fn tmux_screen(session: &str, cmd: &str, done: impl Fn(&str) -> bool) -> String {
    let o = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "120",
            "-y",
            "10",
            cmd,
        ])
        .output()
        .expect("tmux (apt-get install tmux)");
    assert!(o.status.success(), "tmux: {}", stderr(&o));
    let mut screen = String::new();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", session])
            .output()
            .expect("capture");
        screen = String::from_utf8_lossy(&o.stdout).into_owned();
        if done(&screen) {
            break;
        }
    }
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", session])
        .output();
    screen
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_are_stable() {
    let mut c = cluster("exit-codes", small());
    // No daemon running.
    let o = cli(&c, 0, &["status"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    c.start(0).await.expect("alpha");
    // A second daemon on the same control socket is refused, said once.
    let o = cli(&c, 0, &["daemon"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("another daemon is listening").count(),
        1,
        "{}",
        stderr(&o)
    );
    // Not attached.
    let o = cli(&c, 0, &["primary", "demo"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("not attached"));
    // Unknown volume.
    let o = cli(&c, 0, &["attach", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Fresh metadata is not up to date: promotion needs --force.
    c.ok(
        0,
        Request::Attach {
            volume: "demo".into(),
        },
    )
    .await
    .expect("attach");
    let o = cli(&c, 0, &["primary", "demo"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"));
    let o = cli(&c, 0, &["primary", "demo", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The hook returns once the device is there for applications.
    assert!(
        c.nbd_socket(0).exists(),
        "promote returned before the export was up"
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("exported at nbd+unix://"), "{said}");
    // JSON status parses and says what happened.
    let o = cli(&c, 0, &["status", "demo", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    assert_eq!(v["schema"], 1);
    assert_eq!(v["volumes"][0]["role"], "Primary");
    assert_eq!(v["volumes"][0]["disk"], "UpToDate");
    assert_eq!(v["volumes"][0]["peer"]["connection"], "Disconnected");
    assert!(
        v["volumes"][0]["export"]
            .as_str()
            .is_some_and(|e| e.starts_with("nbd+unix://"))
    );
    // Text status is readable.
    let o = cli(&c, 0, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("role=Primary") && text.contains("peer beta: Disconnected"),
        "{text}"
    );
    // Detach a primary that is idle: demotes, then detaches.
    let o = cli(&c, 0, &["detach", "demo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&c, 0, &["status", "demo", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    assert_eq!(v["volumes"][0]["attached"], false);
}

#[test]
fn config_errors_name_the_file_and_key() {
    let dir = blkrep::testkit::cluster::scratch_dir("bad-config");
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("blkrep.toml");
    std::fs::write(
        &cfg,
        "node = \"alpha\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n[link]\npeer_timeout_ms = 10\n[nodes.alpha]\naddress = \"127.0.0.1:1\"\n",
    )
    .expect("write");
    let o = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .arg("daemon")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("blkrep.toml") && e.contains("link.peer_timeout_ms"),
        "{e}"
    );
    std::fs::write(&cfg, "node = [").expect("write");
    let o = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("blkrep.toml"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn create_md_refuses_to_overwrite() {
    let c = cluster("create-md", small());
    // The cluster helper already wrote metadata: a second run is refused.
    let o = cli(&c, 0, &["create-md", "demo"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("already holds blkrep metadata"),
        "{}",
        stderr(&o)
    );
    // A disk with a filesystem on it is refused too.
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&c.nodes[1].disk)
        .output()
        .expect("mkfs.ext4");
    assert!(o.status.success(), "mkfs: {}", stderr(&o));
    let o = cli(&c, 1, &["create-md", "demo"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("ext2/3/4") || e.contains("blkrep metadata"),
        "{e}"
    );
    let o = cli(&c, 1, &["create-md", "demo", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Forced over a filesystem with internal metadata: a warning that the
    // volume is now smaller than that filesystem.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("warning") && out.contains("smaller") && out.contains("ext2/3/4"),
        "{out}"
    );
    // A disk too small says how large it must be.
    let tiny = c.dir.join("tiny.img");
    std::fs::File::create(&tiny)
        .and_then(|f| f.set_len(8192))
        .expect("tiny disk");
    let cfg = std::fs::read_to_string(&c.nodes[0].config).expect("config");
    let disk = c.nodes[0].disk.display().to_string();
    let tiny_cfg = c.dir.join("tiny.toml");
    std::fs::write(&tiny_cfg, cfg.replace(&disk, &tiny.display().to_string())).expect("write");
    let o = Command::new(bin())
        .arg("--config")
        .arg(&tiny_cfg)
        .args(["create-md", "demo", "--force"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("too small") && e.contains("at least"), "{e}");
}

/// Error texts say each cause once ("X: No such file or directory", not
/// the cause twice); a missing config at the default path says how to
/// name another one.
#[test]
fn errors_say_each_cause_once_and_name_the_config_options() {
    let o = Command::new(bin())
        .args(["--config", "/nonexistent/blkrep.toml", "status"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    if !std::path::Path::new(blkrep::config::DEFAULT_CONFIG_PATH).exists() {
        let o = Command::new(bin())
            .env_remove("BLKREP_CONFIG")
            .arg("status")
            .output()
            .expect("run");
        let e = stderr(&o);
        assert!(e.contains("--config") && e.contains("BLKREP_CONFIG"), "{e}");
        assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    }
}

/// A typo of `meta = "internal"` is refused with the key named, and
/// nothing is written in the directory the command runs in; a good run
/// says where the metadata went.
#[test]
fn a_metadata_typo_is_refused_and_writes_nothing() {
    let c = cluster("md-typo", small());
    let cfg = std::fs::read_to_string(&c.nodes[0].config).expect("config");
    let name = &c.nodes[0].name;
    let good = format!("nodes.{name} = {{ disk = ");
    assert!(cfg.contains(&good), "{cfg}");
    let typo_cfg = c.dir.join("typo.toml");
    std::fs::write(
        &typo_cfg,
        cfg.replace("meta = \"internal\"", "meta = \"internl\""),
    )
    .expect("write");
    let cwd = c.dir.join("cwd");
    std::fs::create_dir_all(&cwd).expect("mkdir");
    let o = Command::new(bin())
        .current_dir(&cwd)
        .arg("--config")
        .arg(&typo_cfg)
        .args(["create-md", "demo", "--force"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(".meta") && e.contains("internl") && e.contains("absolute path"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(&cwd).expect("read cwd").collect();
    assert!(
        left.is_empty(),
        "create-md wrote into its working directory: {left:?}"
    );
    let o = cli(&c, 0, &["create-md", "demo", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("internal, at the end of"), "{out}");
}

#[test]
fn certificates_for_bad_node_names_are_refused() {
    let dir = blkrep::testkit::cluster::scratch_dir("cert");
    let o = Command::new(bin())
        .args(["cert", "ca", "--out"])
        .arg(&dir)
        .output()
        .expect("run");
    assert!(o.status.success());
    let o = Command::new(bin())
        .args(["cert", "issue", "Bad_Name", "--ca"])
        .arg(&dir)
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid node name"));
    let o = Command::new(bin())
        .args(["cert", "ca", "--out"])
        .arg(&dir)
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(1),
        "a second CA must not overwrite the first"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ublk_export_without_the_driver_names_the_module_and_nbd() {
    let mut c = cluster(
        "no-ublk",
        blkrep::testkit::cluster::ClusterOptions {
            export: "ublk".into(),
            ..small()
        },
    );
    c.start(0).await.expect("alpha");
    let o = cli(&c, 0, &["attach", "demo"]);
    if std::path::Path::new("/dev/ublk-control").exists() {
        // A kernel with ublk: the attach just works.
        assert!(o.status.success(), "{}", stderr(&o));
    } else {
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains("ublk_drv") && e.contains("nbd"), "{e}");
    }
}

#[test]
fn udev_helper_names_ublk_devices_by_volume() {
    let dir = blkrep::testkit::cluster::scratch_dir("udev");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("vm-101-disk-0.ublk"), "3\n").expect("write");
    std::fs::write(dir.join("other.ublk"), "12\n").expect("write");
    let helper =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-ublk/blkrep-udev-name");
    let o = Command::new(&helper)
        .arg("3")
        .arg(&dir)
        .output()
        .expect("run helper");
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "vm-101-disk-0");
    let o = Command::new(&helper)
        .arg("1")
        .arg(&dir)
        .output()
        .expect("run helper");
    assert!(!o.status.success(), "no volume is served by ublkb1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_shows_resync_progress_in_a_terminal_and_as_lines() {
    let opts = blkrep::testkit::cluster::ClusterOptions {
        resync_rate_max_bytes_per_s: 2 << 20,
        ..small()
    };
    let mut c = cluster("watch", opts);
    for i in 0..2 {
        c.start(i).await.expect("start");
        c.ok(
            i,
            Request::Attach {
                volume: "demo".into(),
            },
        )
        .await
        .expect("attach");
    }
    // The initial full sync of 16 MiB at 2 MiB/s takes about 8 seconds.
    c.ok(
        0,
        Request::Primary {
            volume: "demo".into(),
            force: true,
        },
    )
    .await
    .expect("primary");
    c.wait_for(0, "resync running", WAIT, |s| s.resync.is_some())
        .await
        .expect("resync starts");
    // The target shows the resync too (issue 18: it said `out-of-sync 0 B`
    // and no progress), and its progress moves.
    let first = c
        .wait_for(1, "progress on the target", WAIT, |s| {
            s.resync.as_ref().is_some_and(|r| r.done_bytes > 0)
        })
        .await
        .expect("the target reports the resync");
    let r = first.resync.clone().expect("resync");
    assert!(
        r.total_bytes >= 15 << 20 && r.done_bytes <= r.total_bytes,
        "{r:?}"
    );
    assert!(first.out_of_sync_bytes > 0, "{first:?}");
    c.wait_for(1, "the target's progress moves", WAIT, |s| {
        s.resync
            .as_ref()
            .is_some_and(|x| x.done_bytes > r.done_bytes)
    })
    .await
    .expect("progress moves on the target");
    // Not a terminal: plain lines.
    let o = cli(
        &c,
        0,
        &[
            "status",
            "demo",
            "--watch",
            "--interval-ms",
            "200",
            "--count",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.contains("resync") && text.contains('%') && text.contains("ETA"),
        "{text}"
    );
    // Each line starts with the time of day.
    for line in text.lines() {
        let t = line.split(' ').next().unwrap_or("").as_bytes();
        assert!(
            t.len() == 9 && t[2] == b':' && t[5] == b':' && t[8] == b'Z',
            "no timestamp: {line}"
        );
    }
    // A real terminal (tmux): a progress bar.
    let session = format!("blkrep-watch-{}", std::process::id());
    let watch = |args: &str| {
        format!(
            "{} --config {} status demo --watch {args}",
            bin().display(),
            c.nodes[0].config.display()
        )
    };
    let screen = tmux_screen(&session, &watch("--interval-ms 200 --count 50"), |s| {
        s.contains("[=") && s.contains("resync")
    })
    .await;
    assert!(
        screen.contains("[=") && screen.contains("resync") && screen.contains('%'),
        "screen: {screen}"
    );
    // A volume in sync shows a full bar from the first frame.
    c.wait_in_sync(std::time::Duration::from_secs(120))
        .await
        .expect("in sync");
    let screen = tmux_screen(
        &format!("{session}-2"),
        &watch("--interval-ms 5000 --count 2"),
        |s| s.contains('%'),
    )
    .await;
    assert!(
        screen.contains("100%") && screen.contains("InSync"),
        "screen: {screen}"
    );
}

/// The main job as a newcomer runs it: `blkrep demo --json` kills the
/// primary, promotes the survivor through the hook with the witness's
/// consent, and proves nothing acknowledged was lost.
#[test]
fn demo_json_reports_no_loss_and_a_timeline() {
    let dir = blkrep::testkit::cluster::scratch_dir("demo-test");
    let o = Command::new(bin())
        .args([
            "demo",
            "--json",
            "--size",
            "16M",
            "--duration",
            "1s",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("run demo");
    assert!(o.status.success(), "demo failed: {}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    assert_eq!(report["acked_writes_lost"], 0, "{report}");
    assert_eq!(report["replicas_equal"], true, "{report}");
    assert!(report["acked_writes"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(report["storm_ms"].as_u64().unwrap_or(0) >= 1000, "{report}");
    assert!(
        report["export"] == "nbd" || report["export"] == "ublk",
        "{report}"
    );
    let ms = |k: &str| report[k].as_u64().unwrap_or(0);
    assert!(
        0 < ms("detected_ms")
            && ms("detected_ms") <= ms("first_write_ms")
            && ms("promoted_ms") <= ms("first_write_ms")
            && ms("first_write_ms") <= ms("resync_done_ms"),
        "{report}"
    );
    assert!(!dir.exists(), "the demo cleans up after itself");
}

/// `blkrep bench --json` with fio and with its own load generator: every
/// workload is there with positive figures on both sides and a ratio that
/// matches them, next to the link's measured capacity and round trip.
#[test]
fn bench_reports_every_workload_with_fio_and_with_its_own_generator() {
    for generator in ["fio", "own"] {
        let o = Command::new(bin())
            .args([
                "bench",
                "--json",
                "--size-mib",
                "32",
                "--runtime-s",
                "1",
                "--load-generator",
                generator,
            ])
            .output()
            .expect("run bench");
        assert!(o.status.success(), "bench failed: {}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
        let want_generator = if generator == "fio" {
            "fio"
        } else {
            "blkrep's own load generator"
        };
        assert_eq!(v["load_generator"], want_generator, "{v}");
        assert!(v["capacity_bytes_per_s"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(v["rtt_us"].as_u64().unwrap_or(0) > 0, "{v}");
        let rows = v["workloads"].as_array().expect("workloads");
        let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "4k-randwrite-qd1-sync",
                "4k-randwrite-qd1-sync-p99",
                "4k-randwrite-qd1-fua",
                "4k-randwrite-qd1-fua-p99",
                "4k-randwrite-qd32",
                "1m-seqwrite-qd8",
                "4k-randread-qd1",
                "4k-randread-qd32",
                "4k-randrw70-qd32"
            ],
            "{v}"
        );
        for r in rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            assert!(f("raw") > 0.0 && f("replicated") > 0.0, "{r}");
            let latency = r["unit"].as_str().unwrap_or("").starts_with("us");
            let want = if latency {
                f("raw") / f("replicated")
            } else {
                f("replicated") / f("raw")
            };
            assert!((f("ratio") - want).abs() < 1e-6 * want.max(1.0), "{r}");
            assert!(f("floor") > 0.0, "{r}");
        }
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

#[test]
fn demo_interrupted_with_ctrl_c_stops_its_processes_and_removes_its_files() {
    let dir = blkrep::testkit::cluster::scratch_dir("demo-int");
    let mut child = Command::new(bin())
        .args(["demo", "--size", "16M", "--duration", "60s", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run demo");
    // Interrupt once the storm runs (the daemons and the witness are up).
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let storm = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("write storm"));
    assert!(storm.is_some(), "the demo did not reach its storm");
    let needle = dir.to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&needle).len() >= 4,
        "the demo, the witness and both daemons run from the demo's directory"
    );
    // SAFETY: kill(2) on the PID of our own child process.
    let r = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(r, 0, "SIGINT delivered");
    let o = child.wait_with_output().expect("demo exits");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert!(!dir.exists(), "the demo removed its files");
    assert!(
        processes_mentioning(&needle).is_empty(),
        "the demo stopped every process it started"
    );
}

/// Runs the CLI against node `i` as `uid`/`gid` (no supplementary groups),
/// from a copy of the binary anyone may execute.
fn cli_as(
    c: &blkrep::testkit::cluster::LocalCluster,
    i: usize,
    uid: u32,
    gid: u32,
    args: &[&str],
) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let copy = c.dir.join("blkrep-for-all");
    if !copy.exists() {
        std::fs::copy(bin(), &copy).expect("copy binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    Command::new(&copy)
        .arg("--config")
        .arg(&c.nodes[i].config)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run blkrep as another user")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_for_root_or_its_configured_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root (CI runs as root): skipped");
        return;
    }
    const NOBODY: u32 = 65534;
    const USERS: u32 = 100;
    let mut c = cluster("control-perm", small());
    c.start(0).await.expect("alpha");
    let sock = c.nodes[0].control.clone();
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("socket").mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    // Another user cannot even open it.
    let o = cli_as(&c, 0, NOBODY, NOBODY, &["status"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    // Even if the socket's mode were opened up, the daemon checks who asks.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let o = cli_as(&c, 0, NOBODY, NOBODY, &["attach", "demo"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(stderr(&o).contains("may not use"), "{}", stderr(&o));
    let o = cli(&c, 0, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status");
    assert_eq!(
        v["volumes"][0]["attached"], false,
        "the refused attach did nothing"
    );

    // With `control_group`, that group's members may use it; others not.
    c.kill(0);
    let cfg = std::fs::read_to_string(&c.nodes[0].config).expect("config");
    std::fs::write(
        &c.nodes[0].config,
        format!("control_group = \"nogroup\"\n{cfg}"),
    )
    .expect("config");
    c.start(0).await.expect("alpha with a control group");
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(std::fs::metadata(&sock).expect("socket").gid(), NOBODY);
    let o = cli_as(&c, 0, NOBODY, NOBODY, &["attach", "demo"]);
    assert!(
        o.status.success(),
        "a group member is refused: {}",
        stderr(&o)
    );
    let o = cli_as(&c, 0, NOBODY, USERS, &["status"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    // A group that does not exist is a clear startup error.
    c.kill(0);
    std::fs::write(
        &c.nodes[0].config,
        format!("control_group = \"no-such-group-blkrep\"\n{cfg}"),
    )
    .expect("config");
    let o = cli(&c, 0, &["daemon"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no-such-group-blkrep"),
        "{}",
        stderr(&o)
    );
}

/// Issue 14, hole 4: an NBD export is for root, the daemon's user and the
/// members of `control_group`, like the control socket: mode 0600 (not
/// whatever the umask gave), and the daemon checks each client's
/// credentials even if the mode were opened up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_exports_are_for_root_or_the_control_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root (CI runs as root): skipped");
        return;
    }
    const NOBODY: u32 = 65534;
    let c = up("nbd-perm", small()).await;
    let sock = c.nbd_socket(0);
    let uri = nbd_uri(&c, 0);
    let size_as = |uid: Option<u32>| {
        let mut cmd = Command::new("nbdinfo");
        cmd.arg("--size").arg(&uri);
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        cmd.output().expect("nbdinfo")
    };
    let meta = std::fs::metadata(&sock).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(size_as(None).status.success(), "root reads the export");
    let o = size_as(Some(NOBODY));
    assert!(!o.status.success(), "another user used the export");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let o = size_as(Some(NOBODY));
    assert!(
        !o.status.success(),
        "another user used an export whose mode was opened up"
    );
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    assert!(log.contains("refused an NBD client"), "{log}");
    assert!(size_as(None).status.success(), "root still reads it");
}

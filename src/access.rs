//! Who may use the daemon's Unix sockets (the control socket and the NBD
//! exports): root, the daemon's own user, and the members of the
//! configured `control_group`. Both checks apply: the socket file's mode
//! (0600, or 0660 owned by the group), set before the socket appears under
//! its name, and the connecting process's credentials.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

/// Who may connect: root, the daemon's own user, and the members of
/// `group` when one is configured.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// The daemon's effective uid.
    pub own_uid: u32,
    /// The configured group's gid.
    pub group: Option<u32>,
}

impl Access {
    /// Root only, plus `group` when set.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        Access { own_uid, group }
    }

    /// Whether the process `pid` running as `uid`/`gid` may connect.
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(g) = self.group else {
            return false;
        };
        gid == g || pid.is_some_and(|p| supplementary_groups(p).contains(&g))
    }

    /// Whether the process at the other end of `stream` may use it (its
    /// credentials as the kernel reports them; unknown ones may not).
    pub fn allows_peer(&self, stream: &UnixStream) -> bool {
        let Ok(cred) = stream.peer_cred() else {
            return false;
        };
        self.allows(cred.uid(), cred.gid(), cred.pid())
    }
}

/// The supplementary groups of process `pid` (from /proc; empty if gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The gid of a group given by name (from /etc/group) or number.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| format!("no group named `{name}` in /etc/group"))
}

/// Binds a socket at `path` as [`bind_replacing`] does, unless another
/// process listens there (a second daemon on the same control socket).
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another daemon is listening on {}", path.display()),
        ));
    }
    bind_replacing(path, group)
}

/// Binds a socket at `path`, replacing whatever is there: mode 0600, or
/// 0660 owned by `group` when one is given. The socket is bound under a
/// temporary name and renamed into place once its mode is set, so it never
/// appears at `path` with the mode the umask gave it.
pub fn bind_replacing(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.binding-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = (|| {
        // A socket file's mode decides who may connect: narrow it first.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The socket is 0600 (0660 with a group) whatever the umask gave it,
    /// and nothing is left under the temporary name.
    #[tokio::test]
    async fn sockets_are_private() {
        let dir = std::env::temp_dir().join(format!("blkrep-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root_only = bind(&dir.join("a.sock"), None);
        let grouped = bind(&dir.join("b.sock"), Some(0));
        let (_a, _b) = (root_only.unwrap(), grouped.unwrap());
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().mode() & 0o777;
        assert_eq!(mode("a.sock"), 0o600);
        assert_eq!(mode("b.sock"), 0o660);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Claiming the status socket's path without taking over another live daemon's socket.
//!
//! Two daemons can share a filesystem (two host namespaces on one machine, or a second
//! `rudder run` by mistake). A socket file that answers belongs to a live daemon and is left
//! alone (the start fails naming that process); one that refuses connections was left by a
//! dead daemon and is replaced. A lock file beside it makes the check and the bind one step
//! for daemons starting at the same moment. On exit only our own socket is removed.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Our socket file; dropping it removes the file if it is still the one we bound.
#[derive(Debug)]
pub struct ClaimedSocket {
    path: PathBuf,
    /// Device, inode and change time of the file we bound (inode numbers are reused): a
    /// later daemon's file at the path is not ours.
    identity: (u64, u64, i64, i64),
}

impl Drop for ClaimedSocket {
    fn drop(&mut self) {
        let still_ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| identity(&m) == self.identity);
        if still_ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

/// Binds a listener at `path` (mode 0660) unless a live daemon answers there.
pub fn claim(path: &Path) -> anyhow::Result<(UnixListener, ClaimedSocket)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for --status-socket", dir.display()))?;
    }
    let lock_path = lock_path(path);
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating the lock file {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;

    remove_if_stale(path)?;
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding --status-socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    let meta = std::fs::symlink_metadata(path)?;
    let claimed = ClaimedSocket {
        path: path.to_path_buf(),
        identity: identity(&meta),
    };
    // The lock is released when `lock` closes: the socket now answers for us.
    Ok((listener, claimed))
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Removes the file at `path` if it is a socket nobody answers on; refuses if a live process
/// answers (naming it) or if the file is not a socket.
fn remove_if_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "--status-socket {} exists and is not a socket: remove it or choose another path",
            path.display()
        );
    }
    match UnixStream::connect(path) {
        Ok(stream) => bail!(
            "--status-socket {} is in use by a live daemon ({}): stop it, or give this one its own --status-socket (every host namespace sharing a filesystem needs one)",
            path.display(),
            describe_peer(&stream)
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!("removing the stale status socket {} (its daemon is gone)", path.display());
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking whether a daemon answers on {}", path.display())),
    }
}

/// "pid 1234 (rudder)" for the process listening on the other end of `stream`.
fn describe_peer(stream: &UnixStream) -> String {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials);
    match cred {
        Ok(cred) => {
            let pid = cred.pid();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "another pid namespace".into());
            format!("pid {pid} ({comm})")
        }
        Err(e) => format!("process unknown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_socket(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rudder-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("rudder.sock")
    }

    #[test]
    fn a_live_socket_is_refused_naming_its_process_and_keeps_answering() {
        let path = temp_socket("live");
        let (live, _claimed) = claim(&path).unwrap();
        let err = claim(&path).unwrap_err().to_string();
        assert!(err.contains("in use by a live daemon"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // The first listener's file is untouched.
        UnixStream::connect(&path).unwrap();
        drop(live);
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let path = temp_socket("stale");
        drop(UnixListener::bind(&path).unwrap()); // the file stays: a crashed daemon
        assert!(path.exists());
        let (_listener, _claimed) = claim(&path).unwrap();
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let path = temp_socket("regular");
        std::fs::write(&path, "not a socket").unwrap();
        let err = claim(&path).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }

    #[test]
    fn only_our_own_socket_is_removed_on_exit() {
        let path = temp_socket("own");
        let (listener, claimed) = claim(&path).unwrap();
        drop(listener);
        drop(claimed);
        assert!(!path.exists(), "our socket should be gone");

        // A later daemon's socket at the same path survives our exit.
        let (listener, claimed) = claim(&path).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let (_theirs, _their_claim) = claim(&path).unwrap();
        drop(claimed);
        assert!(path.exists(), "another daemon's socket was removed");
    }
}

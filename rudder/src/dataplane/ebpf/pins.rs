//! Pins in bpffs: the maps and the underlay's TCX links outlive the process, so a restart
//! (clean or not) never detaches the programs, and the next start adopts them: it opens the
//! pinned maps and atomically replaces the programs inside the pinned links.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    SchedClassifier,
};
use rudder_ebpf::names;

/// `statfs` type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Every map the programs share, pinned by name.
pub(super) const PINNED_MAPS: [&str; 15] = [
    names::MAP_CONFIG,
    names::MAP_PEERS,
    names::MAP_SENDERS,
    names::MAP_ENDPOINTS,
    names::MAP_ENDPOINTS6,
    names::MAP_COUNTERS,
    names::MAP_BYTES,
    names::MAP_PEER_TRAFFIC,
    names::MAP_STACK_FLOWS,
    names::MAP_STACK_FLOWS6,
    names::MAP_TRAIN_SENDERS,
    names::MAP_CONFIG6,
    names::MAP_PEERS6,
    names::MAP_SENDERS6,
    names::MAP_PEERS46,
];

/// This underlay's pin directory, locked for the life of the process.
pub(super) struct PinDir {
    pub(super) path: PathBuf,
    /// Holds an exclusive `flock`: a second rudder on the same pins fails at start.
    _lock: std::fs::File,
}

fn is_bpffs(path: &Path) -> bool {
    nix_statfs_type(path) == Some(BPF_FS_MAGIC)
}

fn nix_statfs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `buf` a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    (rc == 0).then_some(buf.f_type as i64)
}

impl PinDir {
    /// `<base>/<underlay>`, created (bpffs mounted on /sys/fs/bpf when `base` is below it
    /// and nothing is mounted there) and locked. `None` (logged) without a bpffs: the data
    /// plane then runs unpinned and a restart interrupts traffic.
    pub(super) fn open(base: &Path, underlay: &str) -> anyhow::Result<Option<Self>> {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if base.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
            if let Err(e) = mount_bpffs(sys_bpf) {
                tracing::warn!("{e:#}; BPF maps and links are not pinned: a restart of rudder interrupts traffic");
                return Ok(None);
            }
        }
        std::fs::create_dir_all(base)
            .with_context(|| format!("creating the BPF pin directory {}", base.display()))?;
        if !is_bpffs(base) {
            tracing::warn!(
                "{} is not on a bpffs (mount -t bpf bpf <dir>, or pass --bpf-pin-dir): BPF maps \
                 and links are not pinned, a restart of rudder interrupts traffic",
                base.display()
            );
            return Ok(None);
        }
        let path = base.join(underlay);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the BPF pin directory {}", path.display()))?;
        let lock =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: a valid open fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "{} is in use: another rudder runs on these pins; stop it first",
                path.display()
            );
        }
        Ok(Some(PinDir { path, _lock: lock }))
    }

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn link(&self, program: &str, direction: &str) -> PathBuf {
        self.path.join(format!("link_{program}_{direction}"))
    }

    /// Whether a previous run left links here to adopt.
    pub(super) fn has_links(&self) -> bool {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("link_"))
            })
            .unwrap_or(false)
    }

    /// Puts `program` into the pinned link for (`ifname`, `direction`) atomically (a TCX link
    /// update: no packet sees the device without a program), or attaches and pins it.
    pub(super) fn attach_or_replace(
        &self,
        program: &mut SchedClassifier,
        name: &str,
        ifname: &str,
        direction: aya::programs::TcAttachType,
    ) -> anyhow::Result<()> {
        let pin = self.link(name, &format!("{direction:?}").to_lowercase());
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening the pinned link {}", pin.display()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not a TCX link", pin.display()))?;
            match program.attach_to_link(link) {
                Ok(_) => return Ok(()),
                // The interface went away (and the link with it): attach anew below.
                Err(e) => {
                    tracing::warn!(
                        "replacing the program in {}: {e}; attaching anew",
                        pin.display()
                    );
                    std::fs::remove_file(&pin).ok();
                }
            }
        }
        let id = program
            .attach(ifname, direction)
            .with_context(|| format!("attaching {name} to {ifname} ({direction:?}) failed: does the interface exist in this namespace?"))?;
        let link = FdLink::try_from(program.take_link(id)?).context("a TCX link is an fd link")?;
        link.pin(&pin)
            .with_context(|| format!("pinning the link of {name} at {}", pin.display()))?;
        Ok(())
    }

    /// Removes the pinned maps (the links stay, with the old programs, until replaced).
    pub(super) fn remove_maps(&self) -> anyhow::Result<()> {
        for name in PINNED_MAPS {
            match std::fs::remove_file(self.map(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing the pinned map {name}"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes every pin: the links detach and the maps go once no fd holds them.
    pub(super) fn remove(&self) -> anyhow::Result<()> {
        std::fs::remove_dir_all(&self.path)
            .with_context(|| format!("removing the BPF pins in {}", self.path.display()))
    }
}

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c("bpf").as_ptr(),
            target.as_ptr(),
            c("bpf").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "mounting bpffs on {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

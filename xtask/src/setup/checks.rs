//! `cargo xtask setup --check`: proves that each tool the project calls does the job it is
//! called for, instead of trusting package names. Checks that need a network run inside a
//! private network namespace (`unshare --net`), so the root namespace is never touched.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One tool, how it is proven, and what to install when the proof fails.
struct Check {
    tool: &'static str,
    /// What is tried, as the failure line says it.
    tried: &'static str,
    /// What provides it: a Debian package, or a command.
    remedy: &'static str,
    run: fn(&Path) -> Result<()>,
}

const CHECKS: &[Check] = &[
    Check {
        tool: "protoc",
        tried: "compiling a .proto that imports google/protobuf/descriptor.proto",
        remedy: "apt-get install protobuf-compiler libprotobuf-dev",
        run: protoc,
    },
    Check {
        tool: "bpf-linker",
        tried: "bpf-linker --version",
        remedy:
            "cargo xtask setup (cargo install bpf-linker --features llvm-22, LLVM from llvm-22-dev)",
        run: |_| ok(Command::new("bpf-linker").arg("--version")),
    },
    Check {
        tool: "rust-src",
        tried: "finding core's source in the toolchain's sysroot (the BPF build uses build-std)",
        remedy: "rustup component add rust-src",
        run: rust_src,
    },
    Check {
        tool: "etcd, etcdctl",
        tried: "starting etcd on loopback in a private namespace, etcdctl put and get",
        remedy: "apt-get install etcd-server etcd-client",
        run: etcd,
    },
    Check {
        tool: "ip",
        tried: "creating a veth pair and a bridge in a private namespace",
        remedy: "apt-get install iproute2",
        run: |_| {
            in_netns(
                "ip link add rt-a type veth peer name rt-b && ip link add rt-br type bridge \
                 && ip link set rt-a master rt-br && ss -V",
            )
        },
    },
    Check {
        tool: "nft",
        tried: "loading a forward-chain ruleset in a private namespace",
        remedy: "apt-get install nftables",
        run: |_| {
            in_netns(
                "printf 'table inet rudder_check {\\n chain f {\\n type filter hook forward priority 0;\\n \
                 ip saddr 10.5.0.0/16 accept\\n }\\n}\\n' | nft -f - \
                 && nft list ruleset | grep -q 10.5.0.0/16",
            )
        },
    },
    Check {
        tool: "iptables",
        tried: "adding a FORWARD rule in a private namespace",
        remedy: "apt-get install iptables",
        run: |_| {
            in_netns(
                "iptables -A FORWARD -s 10.5.0.0/16 -j ACCEPT && iptables -S FORWARD | grep -q 10.5.0.0/16",
            )
        },
    },
    Check {
        tool: "ping",
        tried: "pinging 127.0.0.1 in a private namespace",
        remedy: "apt-get install iputils-ping",
        run: |_| in_netns("ip link set lo up && ping -c 1 -W 2 127.0.0.1"),
    },
    Check {
        tool: "iperf3",
        tried: "a 1 MB transfer over loopback in a private namespace",
        remedy: "apt-get install iperf3",
        run: |_| {
            in_netns(
                "ip link set lo up && (iperf3 -s -1 -p 5299 >/dev/null 2>&1 &) && sleep 0.3 \
                 && iperf3 -c 127.0.0.1 -p 5299 -n 1M",
            )
        },
    },
    Check {
        tool: "tcpdump",
        tried: "tcpdump --version",
        remedy: "apt-get install tcpdump",
        run: |_| ok(Command::new("tcpdump").arg("--version")),
    },
    Check {
        tool: "ethtool",
        tried: "ethtool --version",
        remedy: "apt-get install ethtool",
        run: |_| ok(Command::new("ethtool").arg("--version")),
    },
    Check {
        tool: "setpriv, nsenter, unshare",
        tried: "setpriv --version, nsenter --version, unshare --version",
        remedy: "apt-get install util-linux",
        run: |_| {
            for tool in ["setpriv", "nsenter", "unshare"] {
                ok(Command::new(tool).arg("--version"))?;
            }
            Ok(())
        },
    },
    Check {
        tool: "dockerd, docker",
        tried: "starting dockerd in a private namespace and asking it for its version",
        remedy: "apt-get install docker.io",
        run: dockerd,
    },
    Check {
        tool: "containerd, ctr, runc",
        tried: "containerd --version, ctr --version, runc --version",
        remedy: "apt-get install containerd runc",
        run: |_| {
            ok(Command::new("containerd").arg("--version"))?;
            // The CNI tests' real runtime: `ctr run --cni` against a containerd of their own.
            ok(Command::new("ctr").arg("--version"))?;
            ok(Command::new("runc").arg("--version"))
        },
    },
    Check {
        tool: "busybox (static)",
        tried: "finding a statically linked /bin/busybox with httpd and nc (container images)",
        remedy: "apt-get install busybox-static",
        run: busybox,
    },
    Check {
        tool: "CNI plugins",
        tried: "CNI_COMMAND=VERSION of bridge, host-local and portmap in /usr/lib/cni",
        remedy: "apt-get install containernetworking-plugins",
        run: cni_plugins,
    },
    Check {
        tool: "tincd",
        tried: "tincd --version",
        remedy: "apt-get install tinc",
        run: |_| ok(Command::new("tincd").arg("--version")),
    },
    Check {
        tool: "debootstrap",
        tried: "debootstrap --version",
        remedy: "apt-get install debootstrap",
        run: |_| ok(Command::new("debootstrap").arg("--version")),
    },
    Check {
        tool: "systemd-analyze",
        tried: "systemd-analyze --version",
        remedy: "apt-get install systemd",
        run: |_| ok(Command::new("systemd-analyze").arg("--version")),
    },
];

/// Runs every check, prints a line for each, and fails naming every tool that failed.
pub fn run_all() -> Result<()> {
    let scratch = tempdir()?;
    let mut failed = Vec::new();
    for check in CHECKS {
        let dir = scratch.join(check.tool.replace([',', ' ', '(', ')'], "_"));
        std::fs::create_dir_all(&dir)?;
        match (check.run)(&dir) {
            Ok(()) => eprintln!("setup: check ok: {}", check.tool),
            Err(e) => {
                eprintln!(
                    "setup: check FAILED: {}: {} failed: {e:#}; install: {}",
                    check.tool, check.tried, check.remedy
                );
                failed.push(check.tool);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !failed.is_empty() {
        bail!("setup check failed for: {}", failed.join("; "));
    }
    eprintln!("setup: all {} checks passed", CHECKS.len());
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("rudder-setup-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Runs `cmd` (stdin closed), bounded in time; the error carries the last line it printed.
fn ok(cmd: &mut Command) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut bounded = Command::new("timeout");
    bounded
        .arg("60")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => bounded.env(k, v),
            None => bounded.env_remove(k),
        };
    }
    let out = bounded
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The line that names the error, else the last line printed.
    let lines = || stderr.lines().chain(stdout.lines()).map(str::trim);
    let last = lines()
        .find(|l| l.contains("rror"))
        .or_else(|| lines().rfind(|l| !l.is_empty()))
        .unwrap_or("no output");
    match out.status.code() {
        Some(127) => bail!("{program}: command not found"),
        Some(124) => bail!("{program}: no result within 60 s"),
        code => bail!("{program} exited {code:?}: {last}"),
    }
}

/// A shell script in a new, private network namespace (gone when the script ends).
fn in_netns(script: &str) -> Result<()> {
    ok(Command::new("unshare").args(["--net", "sh", "-ec", script]))
}

fn protoc(dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("check.proto"),
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
         message Check { google.protobuf.FileDescriptorProto file = 1; }\n",
    )?;
    ok(Command::new("protoc")
        .arg("-I")
        .arg(dir)
        .arg("--descriptor_set_out")
        .arg(dir.join("check.pb"))
        .arg(dir.join("check.proto")))
}

fn rust_src(_: &Path) -> Result<()> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/src/lib.rs");
    if !core.is_file() {
        bail!("{} does not exist", core.display());
    }
    Ok(())
}

fn etcd(dir: &Path) -> Result<()> {
    let data = dir.join("data");
    in_netns(&format!(
        "ip link set lo up
         etcd --data-dir {data} --listen-client-urls http://127.0.0.1:23790 \
              --advertise-client-urls http://127.0.0.1:23790 \
              --listen-peer-urls http://127.0.0.1:23800 --log-level error >{dir}/etcd.log 2>&1 &
         pid=$!
         trap 'kill $pid 2>/dev/null' EXIT
         for i in $(seq 50); do
           etcdctl --endpoints=http://127.0.0.1:23790 put /check ok >/dev/null 2>&1 && break
           sleep 0.2
         done
         test \"$(etcdctl --endpoints=http://127.0.0.1:23790 get --print-value-only /check)\" = ok",
        data = data.display(),
        dir = dir.display(),
    ))
}

fn dockerd(dir: &Path) -> Result<()> {
    ok(Command::new("dockerd").arg("--version"))?;
    ok(Command::new("/usr/bin/docker").arg("--version"))?;
    let d = dir.display();
    // No bridge, no iptables: the check proves dockerd starts and answers, nothing else.
    in_netns(&format!(
        "dockerd --data-root {d}/root --exec-root {d}/exec --pidfile {d}/pid -H unix://{d}/sock \
                 --bridge none --iptables=false --ip6tables=false >{d}/dockerd.log 2>&1 &
         pid=$!
         trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
         for i in $(seq 100); do
           /usr/bin/docker -H unix://{d}/sock version >/dev/null 2>&1 && exit 0
           kill -0 $pid 2>/dev/null || {{ tail -n 1 {d}/dockerd.log >&2; exit 1; }}
           sleep 0.2
         done
         tail -n 1 {d}/dockerd.log >&2; exit 1"
    ))
}

fn busybox(_: &Path) -> Result<()> {
    let path = Path::new("/bin/busybox");
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked (busybox, not busybox-static)",
            path.display()
        );
    }
    let out = Command::new(path).arg("--list").output()?;
    let applets = String::from_utf8_lossy(&out.stdout);
    for applet in ["sh", "httpd", "nc", "ping", "ip", "sleep"] {
        if !applets.lines().any(|l| l == applet) {
            bail!("busybox has no {applet} applet");
        }
    }
    Ok(())
}

/// True if a 64-bit little-endian ELF file has a PT_INTERP program header (dynamic linking).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("not a 64-bit ELF file");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("truncated ELF header");
    };
    const PT_INTERP: u32 = 3;
    Ok((0..usize::from(phnum))
        .any(|i| u32_at(phoff as usize + i * usize::from(phentsize)) == Some(PT_INTERP)))
}

fn cni_plugins(_: &Path) -> Result<()> {
    for plugin in ["bridge", "host-local", "portmap"] {
        let path = Path::new("/usr/lib/cni").join(plugin);
        let out = Command::new(&path)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", path.display()))?;
        if !String::from_utf8_lossy(&out.stdout).contains("supportedVersions") {
            bail!(
                "{} answered VERSION without supportedVersions",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_and_a_dynamic_elf_are_told_apart() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            has_interpreter(&me).unwrap(),
            "test binaries are dynamically linked"
        );
        assert!(has_interpreter(b"not an elf").is_err());
    }

    #[test]
    fn a_failing_command_names_itself() {
        let err = ok(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        assert_eq!(err.to_string(), "sh exited Some(3): boom");
        let err = ok(&mut Command::new("no-such-tool-here")).unwrap_err();
        assert_eq!(err.to_string(), "no-such-tool-here: command not found");
    }
}

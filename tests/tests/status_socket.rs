//! Two daemons that share a filesystem and, by mistake, one `--status-socket` path, started
//! at the same moment, several times: exactly one runs, the other exits with one line naming
//! the live daemon's process, and `rudder status` answers for the one that runs. Its socket
//! is removed when it stops; one left by a SIGKILL is replaced by the next start.
//! (Before: the second start unlinked the first one's live socket, and some paired starts
//! ended in "Address already in use".)

use anyhow::{bail, Context, Result};
use rudder_tests::util::{rudder_bin, wait_until};
use rudder_tests::{check, e2e, Cluster, Host, HostOpts};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PAIRED_STARTS: usize = 5;

/// A daemon of `host` started by hand with `--status-socket socket`, logging to `log`.
fn start_with_socket(c: &Cluster, host: &Host, socket: &Path, log: &Path) -> Result<Child> {
    let mut args = host.args().to_vec();
    let at = args
        .iter()
        .position(|a| a == "--status-socket")
        .context("the harness passes --status-socket")?;
    args[at + 1] = socket.display().to_string();
    let child = Command::new("ip")
        .args(["netns", "exec", host.netns()])
        .arg(rudder_bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::options().append(true).open(log)?)
        .spawn()?;
    c.resources().add_pid(child.id());
    Ok(child)
}

/// The pid of the daemon that answers `rudder status` on `socket`.
fn status_pid(socket: &Path) -> Result<u64> {
    let out = Command::new(rudder_bin())
        .args(["status", "--json", "--status-socket"])
        .arg(socket)
        .output()?;
    if !out.status.success() {
        bail!("rudder status: {}", String::from_utf8_lossy(&out.stderr));
    }
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    st["pid"]
        .as_u64()
        .with_context(|| format!("no pid in {st}"))
}

fn terminate(child: &mut Child) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = child.wait()?;
    check!(status.success(), "daemon exit after SIGTERM: {status}");
    Ok(())
}

#[test]
fn a_live_daemons_status_socket_is_never_taken_over() {
    e2e(|c| {
        let hosts = [
            c.add_host_without_daemon(HostOpts::default())?,
            c.add_host_without_daemon(HostOpts::default())?,
        ];
        let socket = c.dir().join("shared").join("rudder.sock");
        let logs: Vec<PathBuf> = (0..2)
            .map(|i| c.dir().join(format!("pair{i}.log")))
            .collect();
        for round in 0..PAIRED_STARTS {
            let mut pair = [
                start_with_socket(c, &hosts[0], &socket, &logs[0])?,
                start_with_socket(c, &hosts[1], &socket, &logs[1])?,
            ];
            let mut exited = None;
            wait_until(
                "one daemon of the pair to give up",
                Duration::from_secs(20),
                || {
                    for (i, child) in pair.iter_mut().enumerate() {
                        if let Some(status) = child.try_wait()? {
                            exited = Some((i, status));
                            return Ok(true);
                        }
                    }
                    Ok(false)
                },
            )
            .with_context(|| {
                let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
                format!(
                    "round {round}: logs:\n{}\n---\n{}",
                    read(&logs[0]),
                    read(&logs[1])
                )
            })?;
            let (loser, status) = exited.expect("set by the wait");
            let winner = 1 - loser;
            let log = std::fs::read_to_string(&logs[loser])?;
            let pid = pair[winner].id();
            check!(
                !status.success()
                    && log.contains("is in use by a live daemon")
                    && log.contains(&format!("pid {pid} (rudder)")),
                "round {round}: the loser ({status}) should name the live daemon pid {pid}: {log}"
            );
            check!(
                !log.contains("Address already in use"),
                "round {round}: {log}"
            );
            check!(
                pair[winner].try_wait()?.is_none(),
                "round {round}: the winner exited too: {}",
                std::fs::read_to_string(&logs[winner])?
            );
            // `rudder status` answers for the daemon that runs.
            let answer = status_pid(&socket)?;
            check!(
                answer == u64::from(pid),
                "round {round}: status answered by pid {answer}, not {pid}"
            );
            if round + 1 < PAIRED_STARTS {
                terminate(&mut pair[winner])?;
                check!(
                    !socket.exists(),
                    "round {round}: the stopped daemon left its socket"
                );
            } else {
                // Killed: its socket stays, stale; the next daemon replaces it.
                pair[winner].kill()?;
                pair[winner].wait()?;
                check!(socket.exists(), "a SIGKILL leaves the socket file");
                let mut next = start_with_socket(c, &hosts[loser], &socket, &logs[loser])?;
                wait_until(
                    "the next daemon to answer on the stale path",
                    Duration::from_secs(20),
                    || {
                        if let Some(status) = next.try_wait()? {
                            bail!(
                                "exited: {status}: {}",
                                std::fs::read_to_string(&logs[loser])?
                            );
                        }
                        Ok(status_pid(&socket).is_ok_and(|p| p == u64::from(next.id())))
                    },
                )?;
                terminate(&mut next)?;
            }
        }
        eprintln!("{PAIRED_STARTS} paired starts: each time one ran and the other named it");
        Ok(())
    });
}

//! flanneld's command line and environment, turned into rudder's before clap parses them.
//!
//! flanneld has no subcommands, parses flags with Go's `flag` package (`-flag`, `--flag`,
//! `-flag=value`, `-flag value`, booleans as `-flag` or `-flag=false`) and reads every flag
//! not on the command line from `FLANNELD_<FLAG>`. So that a unit or init script written for
//! flanneld runs rudder unchanged:
//!
//! * `run` is inserted when the binary is called `flanneld` or the first argument is a flag;
//! * single-dash long flags become double-dash ones;
//! * the flanneld flags rudder has no use for fail with one line saying what to do instead;
//! * `FLANNELD_<FLAG>` is copied to `RUDDER_<FLAG>` when that is unset (RUDDER_ wins).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::Path;

/// rudder's subcommands (and clap's `help`): a first argument naming one is left alone.
pub const SUBCOMMANDS: &[&str] = &["run", "status", "network", "leases", "docker-opts", "help"];

/// Top-level flags that stay top-level (no `run` inserted before them).
const TOP_LEVEL: &[&str] = &["-h", "--help", "-help", "-V", "--version", "-version"];

/// flanneld flags of its Kubernetes mode and what to do instead. `--kube-subnet-mgr=false`
/// (the default) is accepted.
const REJECTED: &[(&str, &str)] = &[
    (
        "kube-subnet-mgr",
        "rudder leases subnets through etcd only; drop it and pass --etcd-endpoints \
         (keep flanneld where the Kubernetes API hands out the subnets)",
    ),
    (
        "kube-api-url",
        "it belongs to --kube-subnet-mgr, which rudder does not have (subnets are leased \
         through etcd: pass --etcd-endpoints)",
    ),
    (
        "kube-annotation-prefix",
        "it belongs to --kube-subnet-mgr, which rudder does not have (subnets are leased \
         through etcd: pass --etcd-endpoints)",
    ),
    (
        "kubeconfig-file",
        "it belongs to --kube-subnet-mgr, which rudder does not have (subnets are leased \
         through etcd: pass --etcd-endpoints)",
    ),
    (
        "set-node-network-unavailable",
        "it belongs to --kube-subnet-mgr, which rudder does not have (subnets are leased \
         through etcd: pass --etcd-endpoints)",
    ),
    (
        "net-config-path",
        "rudder reads the network config from etcd (<etcd-prefix>/config), as flanneld does \
         without --kube-subnet-mgr; drop it and write the config with `rudder network init`",
    ),
];

/// A flanneld flag rudder refuses, as one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected(pub String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn rejected(name: &str) -> Option<&'static str> {
    REJECTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

fn is_false(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "false" | "f" | "0" | "no" | "n" | "off"
    )
}

/// Rewrites argv (program name first) into rudder's syntax. `takes_value(long)` says whether
/// `run`'s flag `--long` consumes the next argument when given without `=`.
pub fn rewrite_args(
    argv: Vec<OsString>,
    takes_value: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, Rejected> {
    let mut it = argv.into_iter();
    let Some(program) = it.next() else {
        return Ok(Vec::new());
    };
    let rest: Vec<OsString> = it.collect();
    let as_flanneld = Path::new(&program)
        .file_name()
        .is_some_and(|n| n == "flanneld");
    let first = rest.first().and_then(|a| a.to_str());
    let mut out = vec![program];
    let run_args = match first {
        Some(f) if TOP_LEVEL.contains(&f) => {
            out.push(normalize_top_level(f).into());
            out.extend(rest.into_iter().skip(1));
            return Ok(out);
        }
        Some("run") => rest.into_iter().skip(1).collect(),
        Some(f) if SUBCOMMANDS.contains(&f) => {
            out.extend(rest);
            return Ok(out);
        }
        Some(f) if f.starts_with('-') => rest,
        _ if as_flanneld => rest,
        // No argument, or an unknown subcommand: clap explains.
        _ => {
            out.extend(rest);
            return Ok(out);
        }
    };
    out.push("run".into());
    out.extend(go_flags(run_args, takes_value)?);
    Ok(out)
}

fn normalize_top_level(flag: &str) -> &str {
    match flag {
        "-help" => "--help",
        "-version" => "--version",
        other => other,
    }
}

/// Go flag syntax to clap's: `-name[=v]` → `--name[=v]`; values after a value-taking flag and
/// everything after `--` are kept as they are.
fn go_flags(
    args: Vec<OsString>,
    takes_value: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, Rejected> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            out.push(arg);
            out.extend(it);
            break;
        }
        let body = match text.strip_prefix("--").or_else(|| text.strip_prefix('-')) {
            Some(b) if !b.is_empty() && !b.starts_with('-') => b,
            _ => {
                out.push(arg);
                continue;
            }
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if name == "h" || name == "help" {
            out.push("--help".into());
            continue;
        }
        if let Some(why) = rejected(name) {
            if name == "kube-subnet-mgr" && value.is_some_and(is_false) {
                continue;
            }
            return Err(Rejected(format!(
                "flanneld's --{name} is not supported: {why}"
            )));
        }
        out.push(format!("--{body}").into());
        if value.is_none() && takes_value(name) {
            if let Some(v) = it.next() {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// The `RUDDER_<FLAG>` variables to set from `FLANNELD_<FLAG>`: for each `known` RUDDER_ name
/// that is unset (or empty) while its FLANNELD_ twin is set and not empty (flanneld ignores
/// empty ones). Fails on the FLANNELD_ twin of a rejected flag.
pub fn env_from_flanneld(
    vars: impl IntoIterator<Item = (String, String)>,
    known: &HashSet<String>,
) -> Result<Vec<(String, String)>, Rejected> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let set = |name: &str| vars.iter().any(|(k, v)| k == name && !v.is_empty());
    let mut copies = Vec::new();
    for (key, value) in &vars {
        let Some(flag) = key.strip_prefix("FLANNELD_") else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let long = flag.to_ascii_lowercase().replace('_', "-");
        if let Some(why) = rejected(&long) {
            if long == "kube-subnet-mgr" && is_false(value) {
                continue;
            }
            return Err(Rejected(format!(
                "{key} (flanneld's --{long}) is not supported: {why}"
            )));
        }
        let target = format!("RUDDER_{flag}");
        if known.contains(&target) && !set(&target) {
            copies.push((target, value.clone()));
        }
    }
    copies.sort();
    Ok(copies)
}

/// The `RUDDER_*` variable names clap reads, from every (sub)command.
pub fn known_env(cmd: &clap::Command) -> HashSet<String> {
    let mut names = HashSet::new();
    collect_env(cmd, &mut names);
    names
}

fn collect_env(cmd: &clap::Command, names: &mut HashSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
            names.insert(env.to_string());
        }
    }
    for sub in cmd.get_subcommands() {
        collect_env(sub, names);
    }
}

/// Long names of `run`'s flags that consume the next argument (not the booleans, which, as in
/// Go, take a value only as `--flag=value`).
pub fn run_value_flags(cmd: &clap::Command) -> HashSet<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let Some(run) = cmd.find_subcommand("run") else {
        return HashSet::new();
    };
    run.get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter(|a| a.get_num_args().is_none_or(|n| n.min_values() > 0))
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// Applies both rewrites to this process: copies `FLANNELD_*` into the environment (call it
/// before any thread starts) and returns the argv to parse. clap reads the environment when a
/// command is built, so parse with a command built after this.
pub fn prepare(cmd: &clap::Command) -> Result<Vec<OsString>, Rejected> {
    for (key, value) in env_from_flanneld(std::env::vars(), &known_env(cmd))? {
        std::env::set_var(key, value);
    }
    let value_flags = run_value_flags(cmd);
    rewrite_args(std::env::args_os().collect(), &|name| {
        value_flags.contains(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(argv: &[&str]) -> Result<Vec<String>, Rejected> {
        let value_flags = [
            "etcd-endpoints",
            "iface",
            "subnet-file",
            "v",
            "kube-api-url",
        ];
        rewrite_args(argv.iter().map(OsString::from).collect(), &|n| {
            value_flags.contains(&n)
        })
        .map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn flags_without_subcommand_run_the_daemon() {
        assert_eq!(
            rw(&[
                "rudder",
                "--etcd-endpoints=http://10.0.0.1:2379",
                "--iface=eth0",
                "--ip-masq"
            ])
            .unwrap(),
            [
                "rudder",
                "run",
                "--etcd-endpoints=http://10.0.0.1:2379",
                "--iface=eth0",
                "--ip-masq"
            ]
        );
    }

    #[test]
    fn the_name_flanneld_runs_the_daemon_even_without_arguments() {
        assert_eq!(
            rw(&["/usr/bin/flanneld"]).unwrap(),
            ["/usr/bin/flanneld", "run"]
        );
        assert_eq!(
            rw(&["flanneld", "-iface", "eth0"]).unwrap(),
            ["flanneld", "run", "--iface", "eth0"]
        );
        // A plain `rudder` still asks for a subcommand.
        assert_eq!(rw(&["rudder"]).unwrap(), ["rudder"]);
    }

    #[test]
    fn subcommands_and_top_level_flags_are_left_alone() {
        for argv in [
            &["rudder", "status", "--json"][..],
            &["rudder", "network", "init", "--network", "10.5.0.0/16"],
            &["rudder", "--help"],
            &["rudder", "--version"],
            &["flanneld", "--version"],
            &["rudder", "leases", "-x"],
        ] {
            assert_eq!(rw(argv).unwrap(), argv);
        }
        assert_eq!(
            rw(&["flanneld", "-version"]).unwrap(),
            ["flanneld", "--version"]
        );
        assert_eq!(rw(&["rudder", "-help"]).unwrap(), ["rudder", "--help"]);
    }

    #[test]
    fn go_syntax_becomes_double_dash() {
        assert_eq!(
            rw(&[
                "flanneld",
                "-etcd-endpoints=http://a:2379,http://b:2379",
                "-iface",
                "eth0",
                "-ip-masq=true",
                "--iptables-forward-rules=false",
                "-v=2",
                "-h"
            ])
            .unwrap(),
            [
                "flanneld",
                "run",
                "--etcd-endpoints=http://a:2379,http://b:2379",
                "--iface",
                "eth0",
                "--ip-masq=true",
                "--iptables-forward-rules=false",
                "--v=2",
                "--help"
            ]
        );
        // `run` given explicitly gets the same treatment.
        assert_eq!(
            rw(&["rudder", "run", "-ip-masq"]).unwrap(),
            ["rudder", "run", "--ip-masq"]
        );
    }

    #[test]
    fn values_and_everything_after_double_dash_are_kept() {
        assert_eq!(
            rw(&["flanneld", "-subnet-file", "-odd-name", "--", "-x"]).unwrap(),
            ["flanneld", "run", "--subnet-file", "-odd-name", "--", "-x"]
        );
        // A boolean does not swallow the next argument.
        assert_eq!(
            rw(&["flanneld", "-ip-masq", "-iface=eth0"]).unwrap(),
            ["flanneld", "run", "--ip-masq", "--iface=eth0"]
        );
    }

    #[test]
    fn kubernetes_flags_fail_with_what_to_do_instead() {
        let e = rw(&["flanneld", "--kube-subnet-mgr"]).unwrap_err();
        assert!(e.0.contains("--kube-subnet-mgr is not supported"), "{e}");
        assert!(e.0.contains("--etcd-endpoints"), "{e}");
        assert!(!e.0.contains('\n'));
        let e = rw(&[
            "flanneld",
            "-net-config-path=/etc/kube-flannel/net-conf.json",
        ])
        .unwrap_err();
        assert!(e.0.contains("rudder network init"), "{e}");
        assert!(rw(&["flanneld", "-kube-api-url", "https://k:6443"]).is_err());
        // The default value is harmless.
        assert_eq!(
            rw(&["flanneld", "--kube-subnet-mgr=false"]).unwrap(),
            ["flanneld", "run"]
        );
    }

    #[test]
    fn value_flags_and_env_names_come_from_rudders_command_line() {
        use clap::CommandFactory;
        let cmd = crate::cli::Cli::command();
        let value_flags = run_value_flags(&cmd);
        for f in ["etcd-endpoints", "iface", "iface-regex", "subnet-file", "v"] {
            assert!(value_flags.contains(f), "{f}");
        }
        for f in [
            "ip-masq",
            "iptables-forward-rules",
            "ip-blackhole-route",
            "tun-offload",
        ] {
            assert!(!value_flags.contains(f), "{f}");
        }
        let env = known_env(&cmd);
        for e in [
            "RUDDER_ETCD_ENDPOINTS",
            "RUDDER_IFACE",
            "RUDDER_IP_MASQ",
            "RUDDER_SUBNET_FILE",
        ] {
            assert!(env.contains(e), "{e}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flanneld_env_is_copied_unless_rudder_env_is_set() {
        let known: HashSet<String> = ["RUDDER_ETCD_ENDPOINTS", "RUDDER_IFACE", "RUDDER_IP_MASQ"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let copies = env_from_flanneld(
            env(&[
                ("FLANNELD_ETCD_ENDPOINTS", "http://10.0.0.1:2379"),
                ("FLANNELD_IFACE", "eth0"),
                ("RUDDER_IFACE", "eth1"),
                ("FLANNELD_IP_MASQ", ""),
                ("FLANNELD_UNKNOWN", "x"),
                ("PATH", "/bin"),
            ]),
            &known,
        )
        .unwrap();
        assert_eq!(
            copies,
            env(&[("RUDDER_ETCD_ENDPOINTS", "http://10.0.0.1:2379")])
        );
    }

    #[test]
    fn flanneld_env_of_rejected_flags_fails() {
        let known = HashSet::new();
        let e =
            env_from_flanneld(env(&[("FLANNELD_KUBE_SUBNET_MGR", "true")]), &known).unwrap_err();
        assert!(e.0.starts_with("FLANNELD_KUBE_SUBNET_MGR"), "{e}");
        assert!(env_from_flanneld(env(&[("FLANNELD_KUBE_SUBNET_MGR", "false")]), &known).is_ok());
    }
}

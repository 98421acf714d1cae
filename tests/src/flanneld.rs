//! Starting a host's daemon as a flanneld unit would: the binary through a symlink named
//! `flanneld`, no subcommand, flanneld's flags in Go syntax, part of them in `FLANNELD_*`
//! environment variables. rudder-only settings (data plane, bridge, TUN name, status socket)
//! go in `RUDDER_*` variables, as a systemd drop-in added for the migration would set them.

/// flanneld's flags that take a value.
const FLANNELD_VALUE_FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "subnet-file",
    "public-ip",
    "public-ipv6",
    "subnet-lease-renew-margin",
    "healthz-ip",
    "healthz-port",
    "iptables-resync",
    "v",
];

/// flanneld's boolean flags.
const FLANNELD_BOOL_FLAGS: &[&str] = &[
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-forward-rules",
    "ip-blackhole-route",
];

/// flanneld flags the conversion moves into `FLANNELD_*` variables, as an environment file
/// (`/run/flannel/options.env`, `/etc/sysconfig/flanneld`) holds them.
const IN_ENVIRONMENT: &[&str] = &["etcd-endpoints", "etcd-prefix", "healthz-port"];

/// Converts a harness command line (`run --flag value ...`, rudder's syntax) into what a
/// flanneld unit runs: (argv after the program name, environment). Values go as
/// `-flag=value`, `-flag value`, `--flag=value` in turn; booleans as `-flag=true|false` or a
/// bare `--flag`.
pub fn flanneld_command_line(args: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut argv = Vec::new();
    let mut env = Vec::new();
    let mut style = 0usize;
    let mut it = args.iter().skip_while(|a| *a == "run").peekable();
    while let Some(arg) = it.next() {
        let Some(body) = arg.strip_prefix("--") else {
            panic!("flanneld_command_line: unexpected argument {arg:?} in {args:?}");
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        let is_bool = FLANNELD_BOOL_FLAGS.contains(&name.as_str());
        let value = match inline {
            Some(v) => Some(v),
            // rudder's booleans also take `--flag false`; Go's take only `--flag=false`.
            None if is_bool => it
                .next_if(|v| *v == "true" || *v == "false")
                .cloned()
                .or(Some("true".into())),
            None => it.next_if(|v| !v.starts_with("--")).cloned(),
        };
        let env_name = name.to_ascii_uppercase().replace('-', "_");
        let flanneld_flag = FLANNELD_VALUE_FLAGS.contains(&name.as_str()) || is_bool;
        if !flanneld_flag {
            env.push((format!("RUDDER_{env_name}"), value.unwrap_or("true".into())));
            continue;
        }
        if IN_ENVIRONMENT.contains(&name.as_str()) {
            env.push((format!("FLANNELD_{env_name}"), value.unwrap_or_default()));
            continue;
        }
        let value = value.unwrap_or_default();
        if is_bool {
            if value == "true" && style.is_multiple_of(2) {
                argv.push(format!("--{name}"));
            } else {
                argv.push(format!("-{name}={value}"));
            }
        } else {
            match style % 3 {
                0 => argv.push(format!("-{name}={value}")),
                1 => argv.extend([format!("-{name}"), value]),
                _ => argv.push(format!("--{name}={value}")),
            }
        }
        style += 1;
    }
    (argv, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn harness_args_become_a_flanneld_unit() {
        let (argv, env) = flanneld_command_line(&s(&[
            "run",
            "--etcd-endpoints",
            "http://192.168.77.1:2379",
            "--subnet-file",
            "/x/subnet.env",
            "--dataplane",
            "tun",
            "--iface",
            "eth0",
            "--ip-masq",
            "--tun-offload",
            "false",
            "--iptables-forward-rules",
            "false",
            "--healthz-port",
            "8471",
        ]));
        assert_eq!(
            argv,
            s(&[
                "-subnet-file=/x/subnet.env",
                "-iface",
                "eth0",
                "--ip-masq",
                "-iptables-forward-rules=false"
            ])
        );
        assert_eq!(
            env,
            [
                ("FLANNELD_ETCD_ENDPOINTS", "http://192.168.77.1:2379"),
                ("RUDDER_DATAPLANE", "tun"),
                ("RUDDER_TUN_OFFLOAD", "false"),
                ("FLANNELD_HEALTHZ_PORT", "8471"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}

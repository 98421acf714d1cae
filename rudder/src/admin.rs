//! Operator commands that talk to etcd directly: `rudder network init|show`, `rudder leases`.
//! They validate with the same code as the daemon, so they reject what the daemon would.

use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde_json::{json, Value};

use crate::cli::{EtcdArgs, LeasesArgs, NetworkInitArgs};
use crate::config::NetworkConfig;
use crate::etcd::listing::list_prefix;
use crate::lease::subnets_prefix;
use crate::subnet::{key_to_subnet, LeaseValue};

async fn connect_once(args: &EtcdArgs) -> anyhow::Result<Client> {
    let opts = crate::etcd::connect_options(args)?;
    Ok(Client::connect(&args.etcd_endpoints, Some(opts)).await?)
}

/// Runs an operator command; an etcd failure becomes one line naming the endpoint, what
/// failed and the flags to pass.
pub async fn explained<T>(
    args: &EtcdArgs,
    command: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match command.await {
        Ok(v) => Ok(v),
        Err(e) => Err(crate::etcd::diagnose::describe_any(&args.etcd_endpoints, e).await),
    }
}

fn config_key(args: &EtcdArgs) -> String {
    format!("{}/config", args.etcd_prefix.trim_end_matches('/'))
}

/// The JSON `network init` writes: only what the operator set, like a hand-written config.
pub fn init_json(args: &NetworkInitArgs) -> Value {
    let mut config = json!({
        "Network": args.network,
        "Backend": {"Type": "udp", "Port": args.port},
    });
    if let Some(len) = args.subnet_len {
        config["SubnetLen"] = json!(len);
    }
    if let Some(min) = &args.subnet_min {
        config["SubnetMin"] = json!(min);
    }
    if let Some(max) = &args.subnet_max {
        config["SubnetMax"] = json!(max);
    }
    config
}

pub async fn network_init(args: &NetworkInitArgs) -> anyhow::Result<()> {
    let text = init_json(args).to_string();
    let config = NetworkConfig::parse(text.as_bytes())?;
    let mut client = connect_once(&args.etcd).await?;
    let key = config_key(&args.etcd);
    let written = if args.force {
        client.put(key.as_str(), text.as_str(), None).await?;
        true
    } else {
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), text.as_str(), None)]);
        client.txn(txn).await?.succeeded()
    };
    if !written {
        bail!("{key} already holds a network config: see it with `rudder network show`; pass --force to replace it");
    }
    println!("wrote {key}: {text}");
    print_config(&config);
    Ok(())
}

pub async fn network_show(args: &EtcdArgs) -> anyhow::Result<()> {
    let mut client = connect_once(args).await?;
    let key = config_key(args);
    let resp = client.get(key.as_str(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .with_context(|| format!("no network config at {key}: create one with `rudder network init --network 10.5.0.0/16`"))?;
    println!("{key}: {}", String::from_utf8_lossy(kv.value()));
    let config = NetworkConfig::parse(kv.value()).with_context(|| format!("{key} is invalid"))?;
    print_config(&config);
    Ok(())
}

fn print_config(c: &NetworkConfig) {
    println!("  Network    {}", c.network);
    println!("  SubnetLen  {}", c.subnet_len);
    println!("  SubnetMin  {}", c.subnet_min);
    println!("  SubnetMax  {}", c.subnet_max);
    println!("  subnets    {}", c.range().len());
    println!("  Backend    {} port {}", c.backend_type, c.port);
}

/// One row of `rudder leases`.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub key: String,
    pub subnet: Option<String>,
    pub public_ip: Option<String>,
    pub backend: Option<String>,
    pub ttl_seconds: Option<i64>,
}

pub async fn leases(args: &LeasesArgs) -> anyhow::Result<()> {
    let mut client = connect_once(&args.etcd).await?;
    let prefix = subnets_prefix(&args.etcd.etcd_prefix);
    let (kvs, _) = list_prefix(client.clone(), &prefix).await?;
    let mut rows = Vec::new();
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).to_string();
        let subnet = key
            .strip_prefix(&prefix)
            .and_then(key_to_subnet)
            .map(|s| s.to_string());
        let value = LeaseValue::parse(kv.value()).ok();
        let ttl_seconds = if kv.lease() != 0 {
            Some(client.lease_time_to_live(kv.lease(), None).await?.ttl())
        } else {
            None
        };
        rows.push(LeaseRow {
            key,
            subnet,
            public_ip: value.as_ref().map(|v| v.public_ip.to_string()),
            backend: value.map(|v| v.backend_type.unwrap_or_else(|| "udp".into())),
            ttl_seconds,
        });
    }
    if args.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"key": r.key, "subnet": r.subnet, "public_ip": r.public_ip,
                       "backend": r.backend, "ttl_seconds": r.ttl_seconds})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", leases_table(&rows));
    }
    Ok(())
}

pub fn leases_table(rows: &[LeaseRow]) -> String {
    let mut out = format!(
        "{:<20} {:<16} {:<8} {}\n",
        "SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES IN"
    );
    for r in rows {
        let expires = match r.ttl_seconds {
            Some(s) if s > 0 => {
                humantime::format_duration(Duration::from_secs(s as u64)).to_string()
            }
            Some(_) => "expired".into(),
            None => "never (no etcd lease)".into(),
        };
        out += &format!(
            "{:<20} {:<16} {:<8} {}\n",
            r.subnet
                .as_deref()
                .unwrap_or(&format!("invalid key {}", r.key)),
            r.public_ip.as_deref().unwrap_or("invalid value"),
            r.backend.as_deref().unwrap_or("-"),
            expires
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, NetworkCommand};
    use clap::Parser;

    fn init_args(extra: &[&str]) -> NetworkInitArgs {
        let mut argv = vec!["rudder", "network", "init"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Network(NetworkCommand::Init(a)) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn init_writes_only_what_was_given_and_validates_like_the_daemon() {
        let a = init_args(&["--network", "10.5.0.0/16", "--subnet-len", "26"]);
        let json = init_json(&a);
        assert_eq!(
            json,
            json!({"Network":"10.5.0.0/16","SubnetLen":26,"Backend":{"Type":"udp","Port":8285}})
        );
        assert!(NetworkConfig::parse(json.to_string().as_bytes()).is_ok());

        let bad = init_args(&["--network", "10.5.0.0/29"]);
        let err = NetworkConfig::parse(init_json(&bad).to_string().as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Network 10.5.0.0/29 is too small: it must be /28 or larger"
        );
    }

    #[test]
    fn lease_table_marks_bad_entries() {
        let table = leases_table(&[
            LeaseRow {
                key: "/p/subnets/10.5.1.0-24".into(),
                subnet: Some("10.5.1.0/24".into()),
                public_ip: Some("192.168.1.2".into()),
                backend: Some("udp".into()),
                ttl_seconds: Some(90),
            },
            LeaseRow {
                key: "/p/subnets/junk".into(),
                subnet: None,
                public_ip: None,
                backend: None,
                ttl_seconds: None,
            },
        ]);
        assert!(table.contains("10.5.1.0/24"), "{table}");
        assert!(table.contains("1m 30s"), "{table}");
        assert!(table.contains("invalid key /p/subnets/junk"), "{table}");
        assert!(table.contains("never (no etcd lease)"), "{table}");
    }
}

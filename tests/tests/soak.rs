//! The churn soak's CI version: 2 minutes on the data plane the pass selects. Stayed-up hosts
//! lose no packet and no TCP transfer; daemons that ran throughout stay within the RSS and fd
//! bounds. The table is printed (`--nocapture` to see it).

use rudder_tests::soak::{run_soak, SoakOpts};
use rudder_tests::Cluster;

#[test]
fn two_minute_churn_soak_loses_nothing_between_hosts_that_stay_up() {
    let cluster = Cluster::new().expect("cluster setup");
    let report = match run_soak(&cluster, &SoakOpts::minutes(2.0)) {
        Ok(r) => r,
        Err(e) => {
            cluster.dump_logs();
            panic!("{e:#}");
        }
    };
    println!("{}", report.table());
    if let Err(e) = report.check() {
        cluster.dump_logs();
        panic!("{e:#}");
    }
}

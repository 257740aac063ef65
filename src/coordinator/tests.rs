//! `PausePlan::validate`: the plan a CLI or a runbook builds is checked, value by
//! value, before any node is contacted; and the order a tier is paused in.

use std::time::Duration;

use super::{PausePlan, PlanError, batches};
use crate::resolve::NodeAddress;

fn plan(tiers: &[&[&str]], lease: &str, max_wait: &str) -> PausePlan {
    let tiers = tiers
        .iter()
        .map(|tier| {
            tier.iter()
                .map(|a| a.parse::<NodeAddress>().unwrap())
                .collect()
        })
        .collect();
    let duration = |text| crate::time::parse_duration(text).unwrap();
    PausePlan::new(tiers, duration(lease), duration(max_wait))
}

#[test]
fn a_sound_plan_passes() {
    assert_eq!(
        plan(&[&["a:1", "b:1"], &["c:1"]], "60s", "10s").validate(),
        Ok(())
    );
}

#[test]
fn each_bad_value_is_refused_by_name() {
    let cases: Vec<(PausePlan, &str)> = vec![
        (plan(&[], "60s", "10s"), "no nodes to pause"),
        (plan(&[&["a:1"], &[]], "60s", "10s"), "tier 2 has no nodes"),
        (
            plan(&[&["a:1"], &["a:1"]], "60s", "10s"),
            "address a:1 is listed twice",
        ),
        (plan(&[&["a:1"]], "0s", "0s"), "max pause wait is 0ms"),
        (
            plan(&[&["a:1"]], "25h", "10s"),
            "lease must be between 1ms and 24h, got 90000000ms",
        ),
        (
            plan(&[&["a:1"]], "10s", "10s"),
            "max pause wait (10000ms) must be shorter than the lease (10000ms)",
        ),
        (plan(&[&["a:1"]], "1s", "5s"), "shorter than the lease"),
        (plan(&[&["a:1"]], "60s", "0ms"), "max pause wait is 0ms"),
        (
            plan(&[&["a:1"]], "0s", "10s"),
            "lease must be between 1ms and 24h, got 0ms",
        ),
    ];
    for (plan, needle) in cases {
        let error = plan.validate().unwrap_err().to_string();
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
    let mut zero_connect = plan(&[&["a:1"]], "60s", "10s");
    zero_connect.connect.connect_timeout = Duration::ZERO;
    assert_eq!(zero_connect.validate(), Err(PlanError::ZeroConnectTimeout));
}

#[test]
fn zero_waits_keep_their_meaning_where_they_have_one() {
    // Not draining at all: a zero wait is no wait, not a mistake.
    let mut no_wait = plan(&[&["a:1"]], "60s", "0ms");
    no_wait.wait_outstanding = false;
    assert_eq!(no_wait.validate(), Ok(()));
    // scalar-admin -m 0 passes upstream's meaning through.
    let mut upstream = plan(&[&["a:1"]], "60s", "0ms");
    upstream.upstream_only = true;
    assert_eq!(upstream.validate(), Ok(()));
}

fn addresses(list: &str) -> Vec<NodeAddress> {
    crate::resolve::parse_address_list(list).unwrap()
}

#[test]
fn the_first_tiers_lowest_address_is_paused_alone_first() {
    let tier = addresses("10.0.0.3:1,10.0.0.1:1,10.0.0.2:1");
    let shown = |batches: Vec<Vec<&NodeAddress>>| {
        batches
            .into_iter()
            .map(|batch| batch.iter().map(ToString::to_string).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shown(batches(0, &tier)),
        [vec!["10.0.0.1:1"], vec!["10.0.0.3:1", "10.0.0.2:1"]]
    );
    assert_eq!(
        shown(batches(1, &tier)),
        [vec!["10.0.0.3:1", "10.0.0.1:1", "10.0.0.2:1"]]
    );
    assert_eq!(shown(batches(0, &tier[..1])), [vec!["10.0.0.3:1"]]);
}

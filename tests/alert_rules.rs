//! The Prometheus alert rules of `stillpoint serve` (docs/alerts/): promtool accepts them,
//! their unit tests pass, a wrong expectation makes those tests fail, and every alert's
//! runbook_url names a section of docs/runbooks/alerts.md. A test binary of its own: it
//! needs promtool, not the integration harness's servers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RULES: &str = "docs/alerts/stillpoint.rules.yml";
const RULE_TESTS: &str = "docs/alerts/stillpoint.rules.test.yml";
const RUNBOOK: &str = "docs/runbooks/alerts.md";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `promtool ARGS…`, failing the test with a hint when promtool is not installed.
fn promtool(args: &[&str], file: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running promtool: {e}; install it with scripts/install-packages \
                 (Debian's prometheus package)"
            )
        })
}

/// promtool prints its findings on stdout and its errors on stderr: a failure shows both.
fn combined_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn promtool_check_accepts_the_rules() {
    let output = promtool(&["check", "rules"], &repo_path(RULES));
    assert!(
        output.status.success(),
        "promtool check rules {RULES} failed ({}):\n{}",
        output.status,
        combined_output(&output)
    );
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let output = promtool(&["test", "rules"], &repo_path(RULE_TESTS));
    assert!(
        output.status.success(),
        "promtool test rules {RULE_TESTS} failed ({}):\n{}",
        output.status,
        combined_output(&output)
    );
}

/// The negative control of the test above: the same unit tests, with one expected alert's
/// severity changed, must fail, and name the alert whose expectation no longer holds.
#[test]
fn a_wrong_expected_severity_fails_the_unit_tests() {
    let scratch = tempfile::tempdir().expect("creating a temporary directory");
    // The test file names its rule file relative to itself: copy both side by side.
    std::fs::copy(
        repo_path(RULES),
        scratch.path().join("stillpoint.rules.yml"),
    )
    .expect("copying the rules");
    let tests = read(&repo_path(RULE_TESTS));
    let expected = "severity: critical\n              cause: stale";
    assert!(
        tests.contains(expected),
        "{RULE_TESTS} no longer expects `{expected}` for StillpointNoRecentPoint; \
         change this test to alter an expectation the file still has"
    );
    let broken_tests = tests.replacen(expected, "severity: warning\n              cause: stale", 1);
    let broken_path = scratch.path().join("stillpoint.rules.test.yml");
    std::fs::write(&broken_path, broken_tests).expect("writing the changed unit tests");

    let output = promtool(&["test", "rules"], &broken_path);
    let printed = combined_output(&output);
    assert!(
        !output.status.success(),
        "promtool test rules passed with a wrong expected severity:\n{printed}"
    );
    // promtool lists each failed expectation as `alertname: NAME, time: T` followed by
    // the expected and the actual alerts: a failure for any other reason (a rule that
    // does not parse) proves nothing about the unit tests.
    assert!(
        printed.contains("alertname: StillpointNoRecentPoint")
            && printed.contains(r#"severity="warning""#),
        "promtool test rules failed, but not on the changed expectation of \
         StillpointNoRecentPoint:\n{printed}"
    );
}

/// Every alert's runbook_url is `docs/runbooks/alerts.md#<alert name in lower case>`, and
/// that section exists: an on-call engineer following the link lands on the right one.
#[test]
fn every_runbook_url_names_a_section_of_the_runbook() {
    let rules = read(&repo_path(RULES));
    let runbook = read(&repo_path(RUNBOOK));
    let sections: Vec<&str> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .collect();

    let mut alert = None;
    let mut urls_checked = 0;
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = Some(name);
        } else if let Some(url) = line.strip_prefix("runbook_url: ") {
            let alert = alert.expect("a runbook_url before the first alert");
            let expected = format!("\"{RUNBOOK}#{}\"", alert.to_lowercase());
            assert_eq!(url, expected, "the runbook_url of {alert} in {RULES}");
            assert!(
                sections.contains(&alert),
                "{RUNBOOK} has no section `## {alert}` for the runbook_url of {alert}"
            );
            urls_checked += 1;
        }
    }
    let rule_count = rules.matches("- alert: ").count();
    assert!(rule_count > 0, "no `- alert:` rule found in {RULES}");
    assert_eq!(
        urls_checked, rule_count,
        "every rule of {RULES} needs a runbook_url annotation"
    );
}

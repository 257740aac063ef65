//! The deployment files under docs/deploy/ (issue 12) are checked here, so they cannot
//! drift into something a cluster or systemd would refuse:
//! - every Kubernetes manifest validates against the Kubernetes schemas
//!   (`kubernetes-validate --strict`, a pinned version, offline);
//! - the ServiceMonitor, a CRD those schemas do not know, against the subset of the
//!   prometheus-operator CRD schema committed in docs/deploy/schemas/;
//! - the runbook inside the ConfigMap parses with the library's own parser, and agrees
//!   with the manifests around it (SRV name, mounted secret files, spool directory,
//!   grace periods above the lease);
//! - the systemd unit passes `systemd-analyze verify` without a complaint.
//!
//! Each check has a negative control: a broken copy in a temporary directory fails it.
//! YAML is read through python3's yaml module (a dependency of kubernetes-validate),
//! turned into JSON, so the workspace needs no YAML crate for a test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use stillpoint::runbook::Runbook;

/// The Kubernetes version the manifests are validated against; one that
/// kubernetes-validate ships schemas for (`kubernetes-validate --help` lists the default).
const KUBERNETES_VERSION: &str = "1.34.0";

/// The one custom resource, which kubernetes-validate cannot check (it only warns that it
/// has no schema, and exits 0): it is checked against its own schema instead.
const SERVICE_MONITOR: &str = "servicemonitor.yaml";

/// Where the Deployment mounts the runbook: relative paths in it would start here.
const RUNBOOK_DIR: &str = "/etc/stillpoint/config";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy")
}

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// Every manifest kubernetes-validate can check: all of kubernetes/ but the CRD objects.
fn core_manifests() -> Vec<PathBuf> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .expect("docs/deploy/kubernetes is readable")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| !path.ends_with(SERVICE_MONITOR))
        .collect();
    manifests.sort();
    manifests
}

fn run(command: &mut Command, what_installs_it: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?} ({error}); {what_installs_it}"))
}

fn kubernetes_validate(files: &[PathBuf]) -> Output {
    run(
        Command::new("kubernetes-validate")
            .args(["-k", KUBERNETES_VERSION, "--strict"])
            .args(files),
        "scripts/install-packages installs it (pip install kubernetes-validate)",
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a Python program on the arguments and returns its stdout; fails the test with
/// its stderr if it exits non-zero.
fn python(program: &str, args: &[&Path]) -> String {
    let output = run(
        Command::new("python3").arg("-c").arg(program).args(args),
        "install python3 (scripts/install-packages)",
    );
    assert!(
        output.status.success(),
        "python3 failed on {args:?}:\n{}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// The documents of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let json = python(
        "import json, sys, yaml\n\
         print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        &[path],
    );
    serde_json::from_str(&json).expect("python printed JSON")
}

/// The one object a manifest file holds (these files hold one each).
fn manifest(name: &str) -> Value {
    let mut documents = yaml_documents(&kubernetes_dir().join(name));
    assert_eq!(documents.len(), 1, "{name} should hold exactly one object");
    documents.remove(0)
}

fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    // JSON is YAML: kubernetes-validate and the schema check read it as such.
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
    path
}

#[test]
fn every_kubernetes_manifest_validates_against_the_kubernetes_schemas() {
    let manifests = core_manifests();
    assert!(
        manifests.len() >= 7,
        "expected the ConfigMap, both Secrets, the Deployment, both Services and the \
         CronJob in docs/deploy/kubernetes, found {manifests:?}"
    );
    let output = kubernetes_validate(&manifests);
    let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "kubernetes-validate refused a manifest:\n{report}"
    );
    // A kind it has no schema for is only a warning with exit status 0: require a
    // "passed" line for every file, so nothing goes unchecked.
    for path in &manifests {
        let passed = format!("{} passed for resource", path.display());
        assert!(
            report.contains(&passed),
            "kubernetes-validate did not validate {}; a custom resource needs a schema \
             of its own (as servicemonitor.yaml has):\n{report}",
            path.display()
        );
    }
}

#[test]
fn a_deployment_without_a_selector_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let mut deployment = manifest("deployment.yaml");
    let removed = deployment["spec"]
        .as_object_mut()
        .expect("the Deployment has a spec")
        .remove("selector");
    assert!(
        removed.is_some(),
        "the Deployment should have had a selector"
    );
    let broken = write_json(scratch.path(), "deployment.yaml", &deployment);

    let output = kubernetes_validate(&[broken]);
    let report = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(
        !output.status.success(),
        "kubernetes-validate accepted a Deployment without a selector:\n{report}"
    );
    assert!(
        report.contains("'selector' is a required property"),
        "{report}"
    );
}

/// Validates a ServiceMonitor file against the committed schema with python's jsonschema
/// (which kubernetes-validate depends on); the error list, empty when it is valid.
fn service_monitor_errors(path: &Path) -> String {
    python(
        "import json, sys, yaml, jsonschema\n\
         schema = json.load(open(sys.argv[1]))\n\
         jsonschema.Draft202012Validator.check_schema(schema)\n\
         for document in yaml.safe_load_all(open(sys.argv[2])):\n\
         \x20   for error in jsonschema.Draft202012Validator(schema).iter_errors(document):\n\
         \x20       print('/'.join(map(str, error.absolute_path)) + ': ' + error.message)",
        &[
            &deploy_dir().join("schemas/servicemonitor.schema.json"),
            path,
        ],
    )
}

#[test]
fn the_service_monitor_validates_against_the_prometheus_operator_schema() {
    let errors = service_monitor_errors(&kubernetes_dir().join(SERVICE_MONITOR));
    assert!(
        errors.is_empty(),
        "servicemonitor.yaml is invalid:\n{errors}"
    );

    // It scrapes the Service's named port with the observer token, from the Secret that
    // holds only that token.
    let monitor = manifest(SERVICE_MONITOR);
    let service = manifest("service.yaml");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        service["metadata"]["labels"]
    );
    let credentials = &endpoint["authorization"]["credentials"];
    let observer = manifest("observer-token-secret.yaml");
    assert_eq!(credentials["name"], observer["metadata"]["name"]);
    let key = credentials["key"].as_str().unwrap();
    assert!(
        observer["stringData"].get(key).is_some(),
        "no {key} in the observer Secret"
    );
}

#[test]
fn a_service_monitor_with_a_misspelled_field_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let mut monitor = manifest(SERVICE_MONITOR);
    let endpoint = monitor["spec"]["endpoints"][0].as_object_mut().unwrap();
    let interval = endpoint
        .remove("interval")
        .expect("the endpoint has an interval");
    endpoint.insert("intervall".to_owned(), interval);
    let broken = write_json(scratch.path(), SERVICE_MONITOR, &monitor);

    let errors = service_monitor_errors(&broken);
    assert!(errors.contains("'intervall' was unexpected"), "{errors:?}");
}

/// The runbook text the ConfigMap holds.
fn configmap_runbook() -> String {
    let configmap = manifest("configmap.yaml");
    configmap["data"]["runbook.toml"]
        .as_str()
        .expect("the ConfigMap holds runbook.toml")
        .to_owned()
}

/// Parses the ConfigMap's runbook with the library, `[schedule]` included: the
/// service must take a point every minute.
fn parsed_runbook() -> Runbook {
    let runbook = Runbook::parse(&configmap_runbook(), Path::new(RUNBOOK_DIR))
        .unwrap_or_else(|error| panic!("the ConfigMap's runbook is invalid: {error}"));
    let point = runbook
        .schedule
        .entries
        .iter()
        .find(|entry| entry.kind == stillpoint::runbook::JobKind::Point)
        .expect("the ConfigMap's runbook schedules points");
    assert_eq!(point.pattern, "* * * * *", "a point every minute");
    runbook
}

/// Every secret file a pod's container sees: each secret volume's mount path joined with
/// the items it projects.
fn mounted_secret_files(pod: &Value, container: &Value) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|volume| volume["name"] == mount["name"])
            .expect("every mount names a volume");
        let mount_path = Path::new(mount["mountPath"].as_str().unwrap());
        let sources = match volume["projected"]["sources"].as_array() {
            Some(sources) => sources.iter().map(|source| &source["secret"]).collect(),
            None => vec![&volume["secret"]],
        };
        for items in sources
            .iter()
            .filter_map(|secret| secret["items"].as_array())
        {
            for item in items {
                files.push(mount_path.join(item["path"].as_str().unwrap()));
            }
        }
    }
    files
}

fn mount_path(container: &Value, volume: &str) -> PathBuf {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume:?} mounted"));
    PathBuf::from(mount["mountPath"].as_str().unwrap())
}

#[test]
fn the_configmap_runbook_parses_and_matches_the_manifests_around_it() {
    let runbook = parsed_runbook();

    // The SRV name is the headless Service's: _<port name>._tcp.<service name>.<ns>.svc…
    let admin = manifest("ledger-admin-service.yaml");
    assert_eq!(
        admin["spec"]["clusterIP"], "None",
        "the ledger Service is headless"
    );
    let srv = runbook.pause.tiers[0].srv.as_deref().expect("an SRV tier");
    let expected = format!(
        "_{}._tcp.{}.",
        admin["spec"]["ports"][0]["name"].as_str().unwrap(),
        admin["metadata"]["name"].as_str().unwrap()
    );
    assert!(srv.starts_with(&expected), "{srv} is not under {expected}");

    let deployment = manifest("deployment.yaml");
    let cronjob = manifest("cronjob.yaml");
    let serve_pod = &deployment["spec"]["template"]["spec"];
    let backup_pod = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    for (what, pod) in [("Deployment", serve_pod), ("CronJob", backup_pod)] {
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|arg| arg.as_str().unwrap())
            .collect();
        let config = args[args.iter().position(|arg| *arg == "--config").unwrap() + 1];
        assert_eq!(
            Path::new(config),
            mount_path(container, "runbook").join("runbook.toml"),
            "the {what}'s --config is not the mounted ConfigMap's runbook"
        );
        // Every file the runbook reads is one the pod mounts.
        let mounted = mounted_secret_files(pod, container);
        let tls = runbook.pause.tls.as_ref().expect("[pause.tls]");
        for file in [
            runbook.pause.token_file.as_ref(),
            tls.ca_root_cert_path.as_ref(),
            runbook.pipeline.age_identity_file.as_ref(),
        ] {
            let file = file.expect("the runbook names the file");
            assert!(
                mounted.contains(file),
                "the runbook reads {} but the {what} mounts only {mounted:?}",
                file.display()
            );
        }
        // Killed only after the nodes' leases have lapsed.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            Duration::from_secs(grace) > runbook.pause.lease,
            "the {what}'s terminationGracePeriodSeconds ({grace}) is not above the lease \
             ({:?})",
            runbook.pause.lease
        );
    }
    // The serve pod also passes both API tokens, which it must mount.
    let serve_container = &serve_pod["containers"][0];
    let mounted = mounted_secret_files(serve_pod, serve_container);
    let args = serve_container["args"].as_array().unwrap();
    for flag in ["--token-file", "--observer-token-file"] {
        let at = args.iter().position(|arg| arg == flag).unwrap();
        let file = PathBuf::from(args[at + 1].as_str().unwrap());
        assert!(
            mounted.contains(&file),
            "{flag} {} is not mounted",
            file.display()
        );
    }
    assert_eq!(
        runbook.archive.spool_dir.as_deref(),
        Some(mount_path(serve_container, "spool").as_path()),
        "the runbook's spool_dir is not the Deployment's spool volume"
    );
}

/// `systemd-analyze verify` of a unit file: its exit status and every complaint. It
/// exits 0 on unknown keys and unparsable values (it only logs them), so a clean unit is
/// one with nothing on stderr.
fn systemd_verify(unit: &Path) -> (bool, String) {
    let output = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(unit),
        "install Debian's systemd package",
    );
    (output.status.success(), text(&output.stderr))
}

/// The unit as committed, in a temporary directory, with its ExecStart binary (which is
/// not installed here: verify checks that it exists) pointed at this test's executable.
fn unit_with_an_existing_binary(dir: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    const BINARY: &str = "/usr/local/bin/stillpoint";
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/stillpoint.service")).unwrap();
    assert_eq!(unit.matches(BINARY).count(), 1, "ExecStart runs {BINARY}");
    let here = std::env::current_exe().unwrap();
    let path = dir.join("stillpoint.service");
    std::fs::write(&path, edit(&unit.replace(BINARY, here.to_str().unwrap()))).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let scratch = tempfile::tempdir().unwrap();
    let unit = unit_with_an_existing_binary(scratch.path(), str::to_owned);
    let (ok, complaints) = systemd_verify(&unit);
    assert!(
        ok && complaints.is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );

    let text = std::fs::read_to_string(&unit).unwrap();
    let timeout: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .and_then(|value| value.strip_suffix('s'))
        .and_then(|seconds| seconds.parse().ok())
        .expect("TimeoutStopSec=<N>s");
    let lease = parsed_runbook().pause.lease;
    assert!(
        Duration::from_secs(timeout) > lease,
        "TimeoutStopSec ({timeout}s) is not above the runbook's lease ({lease:?})"
    );
}

#[test]
fn a_systemd_unit_with_a_misspelled_key_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let unit = unit_with_an_existing_binary(scratch.path(), |unit| {
        unit.replace("ProtectSystem=strict", "ProtectSystm=strict")
    });
    let (_, complaints) = systemd_verify(&unit);
    assert!(
        complaints.contains("Unknown key 'ProtectSystm'"),
        "systemd-analyze verify did not complain: {complaints:?}"
    );
}

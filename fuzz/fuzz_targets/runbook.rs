//! `Runbook::parse` on any text: it either returns a runbook or an error message, and
//! never panics. An accepted runbook satisfies the invariants the backup relies on.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stillpoint::runbook::Runbook;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(runbook) = Runbook::parse(text, Path::new("/etc/stillpoint")) {
        assert!(!runbook.pause.tiers.is_empty());
        assert!(!runbook.databases.is_empty());
        assert!(runbook.pause.max_wait < runbook.pause.lease);
        let mut names: Vec<&str> = runbook.databases.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            runbook.databases.len(),
            "duplicate database names"
        );
    }
});

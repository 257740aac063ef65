//! `manifest::parse` on any bytes (a damaged or hostile manifest.json in storage): it
//! never panics, and a manifest it accepts serializes to JSON that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = manifest::parse("backups/fuzz/manifest.json", data) {
        let json = parsed.to_json();
        let again = manifest::parse("backups/fuzz/manifest.json", &json)
            .unwrap_or_else(|error| panic!("a written manifest does not parse: {error}"));
        assert_eq!(again, parsed);
    }
});

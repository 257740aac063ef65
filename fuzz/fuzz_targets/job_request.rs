//! `api::parse_job_request` on any bytes: the body of `POST /api/v1/jobs` (from an
//! operator-token holder, but bytes from the network all the same).
//!
//! Besides "never panics": a body it accepts was a JSON object with exactly one key,
//! `kind`, whose value is the accepted kind's `as_str()`. The check reads the body with
//! its own visitor that keeps every key as written (serde_json's `Value` keeps only the
//! last of repeated keys).
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, MapAccess, Visitor};
use stillpoint_service::api::parse_job_request;

/// A JSON object's entries in order, repeated keys included; `None` for anything but
/// an object.
struct Entries(Option<Vec<(String, serde_json::Value)>>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Entries, D::Error> {
        struct All;
        impl<'de> Visitor<'de> for All {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(Some(entries)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Entries, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Entries(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Entries, E> {
                Ok(Entries(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Entries, E> {
                Ok(Entries(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Entries, E> {
                Ok(Entries(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Entries, E> {
                Ok(Entries(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Entries, E> {
                Ok(Entries(None))
            }
            fn visit_unit<E>(self) -> Result<Entries, E> {
                Ok(Entries(None))
            }
        }
        deserializer.deserialize_any(All)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(kind) = parse_job_request(data) else {
        return;
    };
    let entries = serde_json::from_slice::<Entries>(data)
        .unwrap_or_else(|error| panic!("accepted {kind}, but the body is not JSON: {error}"))
        .0
        .unwrap_or_else(|| panic!("accepted {kind}, but the body is not an object"));
    let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        ["kind"],
        "accepted {kind} from an object with keys {keys:?}"
    );
    assert_eq!(
        entries[0].1,
        serde_json::Value::String(kind.as_str().to_owned()),
        "accepted {kind} from another value"
    );
});

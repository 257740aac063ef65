//! `points::parse_point` on any bytes (a damaged or hostile `points/<id>/point.json` in
//! storage), with the checks `read_point` applies: it never panics, and a manifest it
//! accepts serializes (serde_json) to JSON that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::points::parse_point;

const PATH: &str = "points/fuzz/point.json";

fuzz_target!(|data: &[u8]| {
    if let Ok(point) = parse_point(PATH, data) {
        let json = serde_json::to_vec(&point).expect("a point serializes");
        let again = parse_point(PATH, &json)
            .unwrap_or_else(|error| panic!("a written point does not parse: {error}"));
        assert_eq!(again, point);
    }
});

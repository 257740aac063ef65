//! `time::parse_duration` on any text: it never panics, never returns more than
//! `MAX_DURATION`, and `format_duration` of what it returns parses back to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::time::{MAX_DURATION, format_duration, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(duration) = parse_duration(text) {
        assert!(duration <= MAX_DURATION, "{text:?} gave {duration:?}");
        let printed = format_duration(duration);
        assert_eq!(parse_duration(&printed), Ok(duration), "{printed:?}");
    }
});

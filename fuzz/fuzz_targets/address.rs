//! `resolve::parse_address_list` on any text: it never panics, and every address it
//! accepts prints as text that parses back to the same address (the state file and
//! reports store addresses as text, so a lossy round trip would unpause the wrong node).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stillpoint::resolve::{NodeAddress, parse_address_list};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addresses) = parse_address_list(text) {
        assert!(!addresses.is_empty());
        for address in addresses {
            let printed = address.to_string();
            let reparsed: NodeAddress = printed
                .parse()
                .unwrap_or_else(|error| panic!("{printed:?} does not parse back: {error}"));
            assert_eq!(reparsed, address, "{printed:?} changed in a round trip");
        }
    }
});

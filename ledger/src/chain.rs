//! The hash-chain rule, shared by the store that writes links and the check that
//! verifies them: each transfer's hash covers the previous link's hash and the transfer
//! itself, so editing, reordering or deleting any committed row breaks every later link.

/// The `prev_hash` of the first link.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `blake3(prev_hash ‖ tx_id ‖ from ‖ to ‖ amount)` as lowercase hex.
///
/// Variable-length parts are length-prefixed and numbers are fixed-width, so that two
/// different transfers can never serialize to the same bytes (with plain decimal
/// concatenation, accounts 1 → 23 and 12 → 3 would collide).
pub fn link_hash(prev_hash: &str, tx_id: &str, from: i64, to: i64, amount: i64) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [prev_hash.as_bytes(), tx_id.as_bytes()] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    for number in [from, to, amount] {
        hasher.update(&number.to_le_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_depend_on_every_field() {
        let base = link_hash(GENESIS_HASH, "tx-1", 1, 2, 30);
        assert_eq!(base.len(), 64);
        assert_eq!(base, link_hash(GENESIS_HASH, "tx-1", 1, 2, 30));
        for other in [
            link_hash(&base, "tx-1", 1, 2, 30),
            link_hash(GENESIS_HASH, "tx-2", 1, 2, 30),
            link_hash(GENESIS_HASH, "tx-1", 2, 1, 30),
            link_hash(GENESIS_HASH, "tx-1", 1, 2, 31),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(
            link_hash(GENESIS_HASH, "tx", 1, 23, 5),
            link_hash(GENESIS_HASH, "tx", 12, 3, 5)
        );
    }
}

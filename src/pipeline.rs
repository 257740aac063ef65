//! The copy pipeline: a database's byte stream → zstd → age → BLAKE3 → storage, and
//! back again for verify and restore. (Being written.)

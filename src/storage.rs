//! Where backups live: a local directory or S3-compatible object storage, through
//! object_store. (Being written.)

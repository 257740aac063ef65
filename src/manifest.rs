//! The backup manifest: the versioned JSON document written last, whose presence is
//! the commit point of a backup. (Being written.)

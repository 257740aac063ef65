//! Throwaway database servers for tests: PostgreSQL and MariaDB started from the
//! system's binaries in temporary directories on free ports, torn down on drop.
//! Installs nothing: `scripts/test` installs the packages first.
//!
//! (Being written; see the API in the helper brief.)

//! Drives monohook's real binaries as an operator would run them: the system tests, the chaos suite
//! and the benchmark all start `ingest`, `worker` and `mono-sim` as processes, talk to them over
//! HTTP, and read their logs.
//!
//! The binaries must be built first (`cargo build --bins`, or `--release` for the benchmark); they
//! are looked up next to the running executable, or in `MONOHOOK_BIN_DIR`.

pub mod bench;
pub mod bodies;
pub mod chaos;
pub mod process;
pub mod system;

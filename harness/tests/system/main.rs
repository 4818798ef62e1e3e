//! System tests: the real binaries as processes (build them first: `cargo build --bins`, as
//! `scripts/test` does), each test with its own database and queue prefix.

mod api;
mod command_line;
mod observability;
mod secrets;
mod story;

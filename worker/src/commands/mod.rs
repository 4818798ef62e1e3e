//! Operator commands of the worker binary (`worker <command>`), one file or folder each. Every
//! command that prints takes `--json`; `output` holds what they share, exit codes included.

pub mod account;
pub mod account_erase;
pub mod dlq;
pub mod output;
pub mod status;

//! Operator commands of the worker binary (`worker <command>`), one file or folder each.

pub mod account;
pub mod dlq;
pub mod status;

//! Operator commands of the worker binary (`worker <command>`), one file each.

pub mod account;

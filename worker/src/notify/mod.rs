//! Notifications to the app's backend: when a batch commits a change of an account's re-auth state,
//! the app is told, signed the Standard Webhooks way, at least once and in order per account.
//!
//! [`change`] decides what a change calls for (pure), `db::notifications` writes it in the batch's
//! transaction and keeps it until delivered, [`sender`] delivers it with [`signing`] to the
//! [`endpoints`] configured, through [`address`]'s guard.

pub mod address;
pub mod change;
pub mod endpoints;
pub mod sender;
pub mod signing;

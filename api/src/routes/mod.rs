//! One file per endpoint.

mod accounts;
mod health;
mod openapi;
mod reauth_link;
mod reauth_token;

pub use accounts::{MAX_LIMIT, get_account, list_accounts};
pub use health::{healthz, readyz};
pub use openapi::{OPENAPI, openapi};
pub use reauth_link::reauth_link;
pub use reauth_token::reauth_token;

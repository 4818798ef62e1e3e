//! api's integration tests: each test gets its own migrated database (`#[sqlx::test]`), its own Mono
//! (wiremock) and its own API on a free port.

mod accounts;
mod answers;
mod cli;
mod contract;
mod helpers;
mod lock_safety;
mod reauth_link;
mod reauth_token;
mod recovery;
mod scopes;
mod sharing;
mod slow_mono;

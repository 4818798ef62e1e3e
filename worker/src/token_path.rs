//! A re-auth delivery's token: when Mono is asked, which fetch on offer it may share, and what a
//! re-authorisation spends. The pipeline runs it, and so does the decisions model
//! (`worker/tests/decisions.rs`), so the model checks this very code.
//!
//! - A delivery is decided again just before Mono would be asked, with its flight already on offer:
//!   a copy that settled the re-auth meanwhile costs no call. Across workers, the call is claimed
//!   in the database first (`Processor::still_needs_token`): a copy taken by another worker at
//!   the same time waits for the claim's token to be stored, and is then a duplicate.
//! - A token the batch would not store (issued before the account's last re-authorisation, or
//!   expired): one shared from another delivery's call is withdrawn and Mono asked anew; one from
//!   this delivery's own call means the stamps and this worker's clock disagree (or it expired while
//!   held), so the delivery is parked rather than asking again at once.
//! - A re-authorisation settled (applied, or stale but spending what was issued before it) ends the
//!   offer of its account's fetch if Mono issued that token before the re-authorisation was
//!   received: the customer may have spent it.

use tokio_util::sync::CancellationToken;

use crate::db::events::EventStatus;
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use crate::processor::{ItemOutcome, Processor};
use crate::tokens::{Flight, TokenFetcher, TokenOutcome};
use shared::event::EventKind;

/// What a delivery that needs a token does next.
pub enum TokenStep {
    /// A copy settled the re-auth meanwhile: back to a batch as it is, which settles it without Mono.
    Settled,
    /// Mono's answer, from this delivery's own call (with the flight that keeps it on offer until
    /// the delivery settles) or shared from another's.
    Answer(TokenOutcome, Option<Flight>),
    /// Park the delivery (first retry tier, no attempt spent), for this reason.
    Park(String),
}

/// The next step for a delivery its batch answered `NeedsToken`. `held` is the token it brought to
/// that batch, if any (which the batch would not store), with the flight of its own call.
pub async fn next_step(
    tokens: &TokenFetcher,
    processor: &Processor,
    event: &IncomingEvent,
    held: Option<(ReauthToken, Option<Flight>)>,
    abandon: &CancellationToken,
) -> TokenStep {
    let account = event.account_id.as_ref().expect("re-auth events carry an account id");
    let mut refused_issued_at = None;
    if let Some((refused, own)) = held {
        if own.is_some() {
            processor.release_token_call(account.as_str()).await;
            // Dropping the flight withdraws its offer: no copy gets this token either.
            return TokenStep::Park(format!(
                "the token Mono issued at {} for this delivery predates the account's last \
                 re-authorisation or has expired (ours, not the event's): parked to fetch a fresh one",
                refused.issued_at
            ));
        }
        refused_issued_at = Some(refused.issued_at);
    }
    let still_needed = || processor.still_needs_token(event, abandon);
    match tokens.fetch_issued_after_if_needed(account, abandon, refused_issued_at, still_needed).await {
        None => TokenStep::Settled,
        Some((outcome, flight)) => {
            // No token to store: the claim on the account's call goes now, or another worker's copy
            // would wait for it to expire. (A token's claim goes with the batch that stores it.)
            if !matches!(outcome, TokenOutcome::Token(_)) {
                processor.release_token_call(account.as_str()).await;
            }
            TokenStep::Answer(outcome, flight)
        }
    }
}

/// Ends the offers of tokens that a batch's settled re-authorisations may have spent.
pub fn spend_offers<'a>(
    tokens: &TokenFetcher,
    settled: impl IntoIterator<Item = (&'a IncomingEvent, &'a ItemOutcome)>,
) {
    for (event, outcome) in settled {
        if let (
            ItemOutcome::Settled(EventStatus::Processed | EventStatus::Stale),
            EventKind::AccountReauthorized,
            Some(account),
        ) = (outcome, &event.kind, &event.account_id)
        {
            tokens.withdraw_offer(account, event.received_at);
        }
    }
}

//! Which notifications a committed change of an account calls for: a pure function of the account as
//! the batch loaded it and as it writes it back.
//!
//! The model, in four rules over (before, after):
//! - `account.unlinked` when the account became unlinked;
//! - otherwise `account.reauth_required` when the flag went from false to true, and
//!   `account.reauthorized` when it went from true to false;
//! - `account.data_available` when the data state moved to its first update after the latest
//!   re-authorisation (on a linked account).
//!
//! A batch in which the flag goes up and down again commits no change of it and notifies nothing of
//! it: the app is told of states, not of every event. A duplicate or a replay that changes nothing
//! notifies nothing. Nothing here carries a token, a link or personal data.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::account::AccountState;

/// The kinds of notification, as the app sees them in `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NoticeKind {
    ReauthRequired,
    Reauthorized,
    Unlinked,
    DataAvailable,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 4] =
        [Self::ReauthRequired, Self::Reauthorized, Self::Unlinked, Self::DataAvailable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthRequired => "account.reauth_required",
            Self::Reauthorized => "account.reauthorized",
            Self::Unlinked => "account.unlinked",
            Self::DataAvailable => "account.data_available",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// One notification the change calls for, with the ordering stamp of the event behind it (when
/// Mono told us).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub changed_at: DateTime<Utc>,
}

/// The notifications a change from `before` to `after` calls for, in the order the app should apply
/// them.
pub fn notices(before: &AccountState, after: &AccountState) -> Vec<Notice> {
    let mut out = Vec::new();
    let reauth_stamp = after.reauth_state_received_at.unwrap_or_default();
    if before.unlinked_at.is_none() && after.unlinked_at.is_some() {
        out.push(Notice { kind: NoticeKind::Unlinked, changed_at: reauth_stamp });
    } else if !before.reauth_required && after.reauth_required {
        out.push(Notice { kind: NoticeKind::ReauthRequired, changed_at: reauth_stamp });
    } else if before.reauth_required && !after.reauth_required {
        out.push(Notice { kind: NoticeKind::Reauthorized, changed_at: reauth_stamp });
    }
    if after.unlinked_at.is_none() && data_after_reauth(after) && !data_after_reauth_told(before, after) {
        out.push(Notice {
            kind: NoticeKind::DataAvailable,
            changed_at: after.data_state_received_at.or(after.data_updated_at).unwrap_or_default(),
        });
    }
    out
}

/// Whether the account has data from after its latest re-authorisation.
fn data_after_reauth(account: &AccountState) -> bool {
    matches!((account.reauthorized_at, account.data_updated_at), (Some(r), Some(d)) if d > r)
}

/// Whether `before` already had data from after the same re-authorisation, on a linked account:
/// then the app was told (in the batch where that first held).
fn data_after_reauth_told(before: &AccountState, after: &AccountState) -> bool {
    before.unlinked_at.is_none()
        && before.reauthorized_at == after.reauthorized_at
        && data_after_reauth(before)
}

/// The body the app receives: small, and the same bytes on every try (they are signed).
#[derive(Debug, Serialize)]
pub struct NoticeBody<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When the notification was written (RFC 3339, UTC).
    pub timestamp: String,
    pub data: NoticeData<'a>,
}

#[derive(Debug, Serialize)]
pub struct NoticeData<'a> {
    pub account_id: &'a str,
    /// 1, 2, 3, ... per account: a notification with a lower sequence than one already applied is
    /// older news.
    pub sequence: i64,
    pub reauth_required: bool,
    pub unlinked: bool,
    /// When Mono told us of the change (the receive time of the webhook behind it).
    pub changed_at: String,
}

pub fn body(notice: &Notice, account: &AccountState, sequence: i64, now: DateTime<Utc>) -> Vec<u8> {
    let body = NoticeBody {
        kind: notice.kind.as_str(),
        timestamp: now.to_rfc3339_opts(SecondsFormat::Millis, true),
        data: NoticeData {
            account_id: &account.id,
            sequence,
            reauth_required: account.reauth_required,
            unlinked: account.unlinked_at.is_some(),
            changed_at: notice.changed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        },
    };
    serde_json::to_vec(&body).expect("a notification body always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::StoredToken;
    use chrono::Duration;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn kinds(before: &AccountState, after: &AccountState) -> Vec<NoticeKind> {
        notices(before, after).into_iter().map(|n| n.kind).collect()
    }

    #[test]
    fn a_raised_flag_notifies_reauth_required_with_the_events_stamp() {
        let before = AccountState::new("a1");
        let after = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("t".into())),
            reauth_state_received_at: Some(at(5)),
            ..before.clone()
        };
        assert_eq!(
            notices(&before, &after),
            vec![Notice { kind: NoticeKind::ReauthRequired, changed_at: at(5) }]
        );
    }

    #[test]
    fn a_lowered_flag_notifies_reauthorized_and_a_later_update_data_available_once() {
        let required = AccountState { reauth_required: true, ..AccountState::new("a1") };
        let reauthorized = AccountState {
            reauth_required: false,
            reauthorized_at: Some(at(10)),
            reauth_state_received_at: Some(at(10)),
            ..required.clone()
        };
        assert_eq!(kinds(&required, &reauthorized), vec![NoticeKind::Reauthorized]);
        let updated = AccountState {
            data_updated_at: Some(at(20)),
            data_state_received_at: Some(at(20)),
            ..reauthorized.clone()
        };
        assert_eq!(kinds(&reauthorized, &updated), vec![NoticeKind::DataAvailable]);
        let again = AccountState { data_updated_at: Some(at(30)), ..updated.clone() };
        assert_eq!(kinds(&updated, &again), vec![], "only the first update after a re-auth");
    }

    #[test]
    fn an_update_before_the_reauth_or_without_one_is_not_data_available() {
        let never = AccountState::new("a1");
        let updated = AccountState { data_updated_at: Some(at(5)), ..never.clone() };
        assert_eq!(kinds(&never, &updated), vec![]);
        let reauthorized = AccountState { reauthorized_at: Some(at(10)), ..never.clone() };
        let older = AccountState { data_updated_at: Some(at(5)), ..reauthorized.clone() };
        assert_eq!(kinds(&reauthorized, &older), vec![]);
    }

    #[test]
    fn unlinking_notifies_unlinked_and_nothing_of_the_flag() {
        let required = AccountState { reauth_required: true, ..AccountState::new("a1") };
        let unlinked = AccountState { reauth_required: false, unlinked_at: Some(at(3)), ..required.clone() };
        assert_eq!(kinds(&required, &unlinked), vec![NoticeKind::Unlinked]);
        assert_eq!(kinds(&unlinked, &unlinked.clone()), vec![]);
    }

    #[test]
    fn no_change_of_state_notifies_nothing() {
        let required = AccountState {
            reauth_required: true,
            reauth_state_received_at: Some(at(1)),
            ..AccountState::new("a1")
        };
        // A new token, a moved guard: the state the app acts on is the same.
        let refreshed = AccountState {
            reauth_token: Some(StoredToken("t2".into())),
            reauth_state_received_at: Some(at(1) + Duration::seconds(5)),
            ..required.clone()
        };
        assert_eq!(kinds(&required, &refreshed), vec![]);
    }

    mod model {
        //! The model: the app applies each notification's state in sequence order. After every
        //! committed batch, over any history (any kinds, any receive order, any batch cuts):
        //! 1. the app's view (re-auth flag, unlinked) is the account's committed state;
        //! 2. a batch that changes neither notifies neither;
        //! 3. `data_available` is told exactly once per re-authorisation that has data after it
        //!    (on a linked account), and never twice for one.
        use super::super::*;
        use crate::handlers::{self, test_support::event_at};
        use crate::mono::ReauthToken;
        use proptest::prelude::*;
        use std::collections::HashSet;

        const KINDS: [&str; 6] = [
            "mono.events.reauthorisation_required",
            "mono.events.account_reauthorized",
            "mono.events.account_updated",
            "mono.events.account_unlinked",
            "mono.events.account_connected",
            "mono.events.sync_failed",
        ];

        fn at(seconds: i64) -> DateTime<Utc> {
            DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
        }

        fn state(account: &AccountState) -> (bool, bool) {
            (account.reauth_required, account.unlinked_at.is_some())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn the_app_told_of_each_batch_holds_the_committed_state(
                history in prop::collection::vec((0usize..6, 0i64..40, any::<bool>()), 1..40),
            ) {
                let mut account = AccountState::new("a1");
                let mut before = account.clone();
                let mut app = (false, false);
                let mut told_for: HashSet<Option<DateTime<Utc>>> = HashSet::new();
                let last = history.len() - 1;
                for (index, (kind, received, cut)) in history.into_iter().enumerate() {
                    let event = event_at(KINDS[kind], at(received), serde_json::json!({}));
                    let token = ReauthToken::for_tests("t", at(received));
                    handlers::apply(Some(&mut account), &event, Some(&token), at(received));
                    if !cut && index != last {
                        continue;
                    }
                    let told = notices(&before, &account);
                    let states: Vec<&Notice> = told.iter().filter(|n| n.kind != NoticeKind::DataAvailable).collect();
                    prop_assert_eq!(state(&before) != state(&account), !states.is_empty(), "{:?} -> {:?}: {:?}", state(&before), state(&account), told);
                    prop_assert!(states.len() <= 1);
                    if !told.is_empty() {
                        app = state(&account);
                    }
                    prop_assert_eq!(app, state(&account));
                    for notice in told.iter().filter(|n| n.kind == NoticeKind::DataAvailable) {
                        prop_assert!(told_for.insert(account.reauthorized_at), "data_available twice for {:?}", account.reauthorized_at);
                        let _ = notice;
                    }
                    if account.unlinked_at.is_none() && data_after_reauth(&account) {
                        prop_assert!(told_for.contains(&account.reauthorized_at), "data after the re-auth of {:?}, never told", account.reauthorized_at);
                    }
                    before = account.clone();
                }
            }
        }
    }

    #[test]
    fn the_body_holds_no_token_and_names_the_state() {
        let account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("secret-token-value".into())),
            customer_id: Some("customer-77".into()),
            ..AccountState::new("acc-1")
        };
        let notice = Notice { kind: NoticeKind::ReauthRequired, changed_at: at(0) };
        let body = String::from_utf8(body(&notice, &account, 3, at(1))).unwrap();
        assert!(!body.contains("secret-token-value") && !body.contains("customer-77"), "{body}");
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["type"], "account.reauth_required");
        assert_eq!(parsed["data"]["account_id"], "acc-1");
        assert_eq!(parsed["data"]["sequence"], 3);
        assert_eq!(parsed["data"]["reauth_required"], true);
        assert_eq!(parsed["data"]["changed_at"], "2027-01-15T08:00:00.000Z");
    }
}

//! What every request handler can reach.

use sqlx::PgPool;
use std::sync::Arc;

use crate::links::LinkDesk;
use crate::mono_access::MonoAccess;
use crate::recorder::IssuanceRecorder;
use crate::redirects::RedirectAllowlist;
use crate::refresh::Refresher;

pub struct AppState {
    pub pool: PgPool,
    /// What calls Mono, for its breaker's and key's state.
    pub mono: Arc<MonoAccess>,
    pub refresher: Arc<Refresher>,
    pub links: Arc<LinkDesk>,
    pub recorder: IssuanceRecorder,
    /// Where a re-auth link may send the customer back to (`MONO_REAUTH_REDIRECT_URLS`).
    pub redirects: RedirectAllowlist,
}

//! Who is asking: the label of the API key in `Authorization: Bearer <key>`, and the request's id.
//! Extracting a [`Caller`] is what makes a route authenticated.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use std::future::{Ready, ready};

use crate::auth::{ApiKeys, Scope, Scopes};
use crate::errors::ApiError;

/// The request id (`x-request-id`, the client's if it sent a sane one), set by the middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_label: String,
    pub request_id: String,
    /// What the caller's key may do.
    pub scopes: Scopes,
}

impl Caller {
    /// 403 unless the caller's key may do `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.allows(scope) { Ok(()) } else { Err(ApiError::Forbidden(scope.as_str())) }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let keys = request.app_data::<web::Data<ApiKeys>>().expect("the API keys are registered");
        let header = request.headers().get("authorization").map(|v| v.as_bytes());
        let caller = keys.verify_header(header).map(|label| Caller {
            scopes: keys.scopes_of(label),
            key_label: label.to_owned(),
            request_id: request.extensions().get::<RequestId>().map(|id| id.0.clone()).unwrap_or_default(),
        });
        ready(caller.ok_or(ApiError::Unauthorized))
    }
}

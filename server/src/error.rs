//! The server's one error type and its RFC 9457 `application/problem+json`
//! form. Client mistakes say what to do next; internal failures are logged and
//! answered with a body that hides them.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: the request is malformed or a value is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no credentials, or credentials that are invalid or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: valid credentials without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with what exists (same version with another digest, a taken name).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the server accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but refers to something unusable (a tag not in the registry).
    #[error("{0}")]
    Unprocessable(String),
    /// 429: too many requests; retry after this many seconds.
    #[error("{0}")]
    TooManyRequests(String, u64),
    /// 502: the registry answered with something unexpected.
    #[error("{0}")]
    BadGateway(String),
    /// 503: a dependency (database, registry) is unreachable; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a database failure; logged, hidden from the client.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// 500: anything unexpected; logged, hidden from the client.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// Shorthand for handler results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank`: the status says it all).
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            Error::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(e) if is_unavailable(e) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Database(e) if is_bad_value(e) => StatusCode::BAD_REQUEST,
            Error::Database(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 404 for a named thing.
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Error::NotFound(format!("{what} not found"))
    }
}

/// The database refused a value the client sent (SQLSTATE class 22: NUL bytes
/// in text, numbers or times out of range), not a fault of the server.
fn is_bad_value(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")))
}

/// The database is down or overloaded rather than the query being wrong.
fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

/// Maps a unique-constraint violation named `constraint` to a 409 with `message`;
/// any other error passes through.
pub fn on_constraint(
    constraint: &str,
    message: impl Into<String>,
) -> impl FnOnce(sqlx::Error) -> Error {
    let constraint = constraint.to_string();
    let message = message.into();
    move |e| match &e {
        sqlx::Error::Database(d) if d.constraint() == Some(constraint.as_str()) => {
            Error::Conflict(message)
        }
        _ => Error::Database(e),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Error::Database(e) if status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(error = %e, "database unavailable");
                "the database is unavailable; retry in a few seconds".to_string()
            }
            Error::Database(sqlx::Error::Database(d)) if status == StatusCode::BAD_REQUEST => {
                format!(
                    "a value in the request is invalid or out of range: {}",
                    d.message()
                )
            }
            Error::Database(_) | Error::Internal(_) => {
                tracing::error!(error = %self, "internal error");
                "internal server error; the server log has the details".to_string()
            }
            other => other.to_string(),
        };
        let mut response = problem(status, detail);
        if let Error::TooManyRequests(_, secs) = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A problem+json response.
pub fn problem(status: StatusCode, detail: String) -> Response {
    let body = Problem {
        kind: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("Error").into(),
        status: status.as_u16(),
        detail,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

impl From<JsonRejection> for Error {
    fn from(r: JsonRejection) -> Self {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                Error::PayloadTooLarge("request body too large; the limit is 1 MiB".into())
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ),
            _ => Error::BadRequest(format!("invalid JSON body: {}", r.body_text())),
        }
    }
}

impl From<crate::rules::channel::Refused> for Error {
    fn from(r: crate::rules::channel::Refused) -> Self {
        Error::BadRequest(r.0)
    }
}

impl From<PathRejection> for Error {
    fn from(r: PathRejection) -> Self {
        Error::BadRequest(format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for Error {
    fn from(r: QueryRejection) -> Self {
        Error::BadRequest(format!("invalid query string: {}", r.body_text()))
    }
}

/// `axum::Json` whose rejection is a problem+json [`Error`].
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(Error))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is a problem+json [`Error`].
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejection is a problem+json [`Error`].
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Error))]
pub struct Query<T>(pub T);

//! Liveness, readiness and Prometheus metrics.

use crate::app::AppState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

/// Request counters by status class.
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; 5],
    /// Resolutions answered.
    pub resolves: AtomicU64,
    /// Releases published.
    pub publishes: AtomicU64,
    /// Change notifications received from other servers (and reconnections
    /// of the listening connection).
    pub notifications: AtomicU64,
}

/// Counts every response by status class.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    state.metrics.requests[class].fetch_add(1, Ordering::Relaxed);
    response
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// Whether the server is ready; the detail only for an admin.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    /// For an admin: `ok` or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// For an admin: each registry the products live in, `ok` or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<std::collections::BTreeMap<String, String>>,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "ok")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Whether the server can do its work: 503 when the database does not
/// answer. Anyone learns only that; an admin's request also gets the
/// database's state and each product registry's (a registry that is down
/// keeps the server ready, since it only stops publishing). Registries are
/// pinged only for an admin, so nobody else can make the server call them.
#[utoipa::path(get, path = "/readyz", tag = "health", security((), ("bearer" = [])),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn readyz(State(state): State<AppState>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let admin = matches!(
        crate::api::auth::Principal::from_request_parts(&mut parts, &state).await,
        Ok(p) if p.role() == crate::infra::jwt::Role::Admin
    );
    let limit = std::time::Duration::from_secs(2);
    let hosts = tokio::time::timeout(
        limit,
        sqlx::query_scalar!(
            r#"SELECT DISTINCT split_part(repository, '/', 1) AS "host!" FROM products"#
        )
        .fetch_all(&state.db),
    )
    .await;
    let (database, hosts) = match hosts {
        Ok(Ok(hosts)) => ("ok".to_string(), hosts),
        Ok(Err(e)) => (format!("unavailable: {e}"), vec![]),
        Err(_) => ("unavailable: no answer within 2 s".to_string(), vec![]),
    };
    let (status, word) = if database == "ok" {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    if !admin {
        let body = Readiness {
            status: word.into(),
            database: None,
            registries: None,
        };
        return (status, axum::Json(body)).into_response();
    }
    let checks = hosts.into_iter().map(|host| {
        let state = state.clone();
        async move {
            let r = match tokio::time::timeout(limit, state.registry.ping(&host)).await {
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(e)) => format!("unavailable: {e}"),
                Err(_) => "unavailable: no answer within 2 s".to_string(),
            };
            (host, r)
        }
    });
    let registries = futures::future::join_all(checks)
        .await
        .into_iter()
        .collect();
    (
        status,
        axum::Json(Readiness {
            status: word.into(),
            database: Some(database),
            registries: Some(registries),
        }),
    )
        .into_response()
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    let mut out = String::from(
        "# HELP sluice_http_responses_total HTTP responses by status class.\n# TYPE sluice_http_responses_total counter\n",
    );
    for (i, c) in m.requests.iter().enumerate() {
        out.push_str(&format!(
            "sluice_http_responses_total{{class=\"{}xx\"}} {}\n",
            i + 1,
            c.load(Ordering::Relaxed)
        ));
    }
    out.push_str(&format!(
        "# HELP sluice_resolves_total Resolutions answered.\n# TYPE sluice_resolves_total counter\nsluice_resolves_total {}\n",
        m.resolves.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# HELP sluice_publishes_total Releases published.\n# TYPE sluice_publishes_total counter\nsluice_publishes_total {}\n",
        m.publishes.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# HELP sluice_notifications_total Change notifications received from other servers.\n# TYPE sluice_notifications_total counter\nsluice_notifications_total {}\n",
        m.notifications.load(Ordering::Relaxed)
    ));
    out.push_str(&format!("# HELP sluice_db_pool_connections Open database connections.\n# TYPE sluice_db_pool_connections gauge\nsluice_db_pool_connections {}\n", state.db.size()));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}

//! The application: shared state, the HTTP root that merges every resource's
//! router, and `run(listener, shutdown)` so tests can bind port 0.

use crate::api::{
    audit, auth, channels, devices, health, keys, products, releases, stats, tokens, transfer,
};
use crate::config::Config;
use crate::error::{Error, problem};
use crate::infra::registry;
use crate::infra::tls::ClientAddr;
use crate::resolve;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::connect_info::Connected;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::serve::IncomingStream;
use sqlx::PgPool;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The state behind [`AppState`].
pub struct Inner {
    /// The database pool.
    pub db: PgPool,
    /// The configuration the server started with.
    pub config: Config,
    /// Signing keys.
    pub keys: crate::infra::keystore::KeyStore,
    /// JWT signing secret.
    pub jwt: crate::infra::jwt::JwtKeys,
    /// The OCI registry client.
    pub registry: registry::Registry,
    /// Counters for `/metrics`.
    pub metrics: health::Metrics,
    /// Snapshots the resolve path answers from.
    pub cache: resolve::Cache,
    /// Check-ins waiting to be written.
    pub checkins: resolve::Checkins,
    /// Resolve answers waiting for their (batched) signature.
    pub answers: resolve::AnswerSigner,
    /// Rate limits on logins, enrollments and devices.
    pub limits: crate::infra::ratelimit::Limits,
    /// Devices whose tokens are refused (revoked, deleted, reset).
    pub revocations: crate::infra::revocations::Revocations,
    /// Tables of contents read for transfer estimates.
    pub transfer: crate::api::transfer::Cache,
    /// The time the fleet policy reads (waves, windows, leases).
    pub clock: crate::infra::clock::Clock,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Connects nothing: wraps ready parts.
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }
}

/// The OpenAPI document's frame; paths come from each module's router.
#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice", description = "Image-based OS releases: publish, sign, roll out, resolve."),
    modifiers(&BearerAuth),
    // Listed here as well: operations that name their errors by `Problems` refer to it only by name.
    components(schemas(crate::error::Problem)),
    tags(
        (name = "auth", description = "Logging in"),
        (name = "tokens", description = "API tokens for CI"),
        (name = "products", description = "Products"),
        (name = "releases", description = "Published builds"),
        (name = "channels", description = "Release channels and rollouts"),
        (name = "devices", description = "Enrolled devices and their reports"),
        (name = "leases", description = "Reboot leases (the FleetLock protocol)"),
        (name = "audit", description = "Who changed what"),
        (name = "keys", description = "Public keys"),
        (name = "health", description = "Liveness, readiness, metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every API route with its OpenAPI description.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(tokens::router())
        .merge(products::router())
        .merge(releases::router())
        .merge(channels::router())
        .merge(transfer::router())
        .merge(stats::router())
        .merge(resolve::router())
        .merge(devices::router())
        .merge(crate::api::fleetlock::router())
        .merge(keys::router())
        .merge(audit::router())
        .merge(health::router())
}

/// The OpenAPI document the server serves (and `openapi/openapi.json` holds).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    problem_responses(&mut doc);
    doc
}

/// The media type of every error answer.
const PROBLEM: &str = "application/problem+json";

/// A [`crate::error::Problem`] body, as the document lists it.
fn problem_response(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new()
        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
            "Problem",
        ))))
        .build();
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(PROBLEM, content)
            .build(),
    )
}

/// The error statuses an operation lists, each a problem answer:
/// `responses((status = 200, body = Device), Problems<400, 401, 403, 404>)`.
/// Places left out are 0 and list nothing.
pub struct Problems<
    const A: u16,
    const B: u16 = 0,
    const C: u16 = 0,
    const D: u16 = 0,
    const E: u16 = 0,
    const F: u16 = 0,
    const G: u16 = 0,
    const H: u16 = 0,
>;

impl<
    const A: u16,
    const B: u16,
    const C: u16,
    const D: u16,
    const E: u16,
    const F: u16,
    const G: u16,
    const H: u16,
> utoipa::IntoResponses for Problems<A, B, C, D, E, F, G, H>
{
    fn responses() -> std::collections::BTreeMap<String, RefOr<Response>> {
        [A, B, C, D, E, F, G, H]
            .into_iter()
            .filter(|&status| status != 0)
            .map(|status| (status.to_string(), problem_response("")))
            .collect()
    }
}

/// Every error answer is `application/problem+json`, and any status an
/// operation does not list (413, 415, 429, 503, ...) is covered by a
/// `default` problem response.
fn problem_responses(doc: &mut utoipa::openapi::OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        // `/readyz` answers its own JSON body with 503, on purpose; the
        // FleetLock protocol's errors are its own `{kind, value}`.
        if path == "/readyz"
            || path.ends_with("/v1/pre-reboot")
            || path.ends_with("/v1/steady-state")
        {
            continue;
        }
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            for (code, response) in op.responses.responses.iter_mut() {
                if let (true, RefOr::T(r)) = (code.as_str() >= "400", response)
                    && let Some(content) = r.content.shift_remove("application/json")
                {
                    r.content.insert(PROBLEM.into(), content);
                }
            }
            op.responses
                .responses
                .entry("default".into())
                .or_insert_with(|| problem_response("An error, as RFC 9457 problem details"));
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = api().split_for_parts();
    problem_responses(&mut doc);
    let doc_json = doc.to_pretty_json().expect("OpenAPI serializes");
    let mut app = api
        .route(
            "/openapi.json",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    doc_json,
                )
            }),
        )
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/docs/openapi.json", doc));
    if let Some(ceiling) = crate::bench::ceiling_route() {
        app = app.merge(ceiling);
    }
    app = dashboard(app, state.config.web_dir.clone());
    app.method_not_allowed_fallback(|| async {
        problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route; see /docs".into(),
        )
    })
    .layer(DefaultBodyLimit::max(BODY_LIMIT))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        health::track,
    ))
    .with_state(state)
}

/// Longest a request may take (publishing talks to the registry with 15 s limits).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The router under a deadline: answers 503 when a request takes longer than
/// [`REQUEST_TIMEOUT`], instead of hanging. It wraps the whole router (in
/// [`serve`]) rather than being one of its layers, which axum applies to
/// each route, boxing the future and cloning the service of every request;
/// and a request whose answer is ready at its first poll arms no timer.
#[derive(Clone)]
struct Deadline<S>(S);

impl<S> tower::Service<axum::extract::Request> for Deadline<S>
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
    S::Future: Unpin,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        DeadlineFuture {
            inner: self.0.call(req),
            timer: None,
        }
    }
}

/// [`Deadline`]'s answer: the router's, or a 503 once the timer fires.
struct DeadlineFuture<F> {
    inner: F,
    /// Armed when the answer was not ready at the first poll.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(r) = std::pin::Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(r);
        }
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(REQUEST_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the request took longer than {} s; retry later",
                    REQUEST_TIMEOUT.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The dashboard built into the binary: `web/dist` as it was when the server
/// was compiled (`build.rs` rebuilds when it changes). Empty when the
/// dashboard was not built first; the server then says so at `/`.
#[derive(rust_embed::Embed)]
#[folder = "../web/dist"]
#[allow_missing = true]
struct Dashboard;

/// Whether this binary carries a dashboard.
pub fn dashboard_embedded() -> bool {
    Dashboard::get("index.html").is_some()
}

/// Serves the dashboard at `/`: the one built into the binary, or the folder
/// `SLUICE_WEB_DIR` names (for working on the dashboard without rebuilding).
/// Hashed assets are cached for good, `index.html` answers every other path so
/// the app's own routes load. Paths under `/v1/` never fall through to the
/// page: an unknown one is a problem+json 404.
fn dashboard(app: Router<AppState>, dir: Option<std::path::PathBuf>) -> Router<AppState> {
    let app = app.route(
        "/v1/{*rest}",
        axum::routing::any(|| async {
            Error::NotFound("no such route; see /docs for the API".into())
        }),
    );
    match dir {
        Some(dir) => dashboard_dir(app, dir),
        None => app
            .route("/assets/{*file}", axum::routing::get(embedded_asset))
            .fallback(embedded_page),
    }
}

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// `/assets/...` from the binary: a missing asset is a 404, never the page.
async fn embedded_asset(
    axum::extract::Path(file): axum::extract::Path<String>,
) -> axum::response::Response {
    match Dashboard::get(&format!("assets/{file}")) {
        Some(f) => embedded_response(f, IMMUTABLE),
        None => Error::NotFound(format!("no dashboard asset {file:?}")).into_response(),
    }
}

/// Any other path: a file at the top of `web/dist` (favicon), else the page.
async fn embedded_page(uri: axum::http::Uri) -> axum::response::Response {
    let path = uri.path().trim_start_matches('/');
    let file = (!path.is_empty() && !path.contains('/'))
        .then(|| Dashboard::get(path))
        .flatten();
    match file.or_else(|| Dashboard::get("index.html")) {
        Some(f) => embedded_response(f, "no-cache"),
        None => problem(
            StatusCode::NOT_FOUND,
            "this sluice binary was built without its dashboard: run `npm ci && npm run build` \
             in web/ and rebuild, or set SLUICE_WEB_DIR to a built web/dist; the API is at /v1 \
             (see /docs)"
                .into(),
        ),
    }
}

fn embedded_response(f: rust_embed::EmbeddedFile, cache: &'static str) -> axum::response::Response {
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG};
    let etag = format!("\"{}\"", hex::encode(&f.metadata.sha256_hash()[..16]));
    (
        [
            (CONTENT_TYPE, f.metadata.mimetype().to_string()),
            (CACHE_CONTROL, cache.to_string()),
            (ETAG, etag),
        ],
        f.data,
    )
        .into_response()
}

/// The dashboard from a folder (`SLUICE_WEB_DIR`).
fn dashboard_dir(app: Router<AppState>, dir: std::path::PathBuf) -> Router<AppState> {
    use axum::http::{HeaderValue, header::CACHE_CONTROL};
    use tower::Layer;
    use tower_http::services::{ServeDir, ServeFile};
    use tower_http::set_header::SetResponseHeaderLayer;
    let index = dir.join("index.html");
    if !index.is_file() {
        tracing::warn!(
            "SLUICE_WEB_DIR {} has no index.html: build the dashboard with `npm ci && npm run build` in web/",
            dir.display()
        );
    }
    let assets =
        SetResponseHeaderLayer::overriding(CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE))
            .layer(ServeDir::new(dir.join("assets")));
    let pages =
        SetResponseHeaderLayer::overriding(CACHE_CONTROL, HeaderValue::from_static("no-cache"))
            .layer(ServeDir::new(&dir).fallback(ServeFile::new(index)));
    app.nest_service("/assets", assets).fallback_service(pages)
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve(listener, state, shutdown).await
}

/// Like [`run`], over HTTPS with the given rustls configuration.
pub async fn run_tls(
    listener: TcpListener,
    tls: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = crate::infra::tls::TlsListener::new(listener, tls)?;
    serve(listener, state, shutdown).await
}

/// [`run`] and [`run_tls`] over either listener.
async fn serve<L>(
    listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    ClientAddr: for<'a> Connected<IncomingStream<'a, L>>,
{
    let app = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
        ClientAddr,
    >(Deadline(router(state.clone())));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // Check-ins are written behind: none may be lost on a clean shutdown.
    state.checkins.flush().await;
    Ok(())
}

/// Connects to the database, runs migrations, loads keys: a ready state.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    let db = crate::db::connect(&config.database_url).await?;
    crate::db::migrate(&db).await?;
    state_with_pool(config, db).await
}

/// A ready state over an existing, migrated pool (tests use their own database).
pub async fn state_with_pool(config: Config, db: PgPool) -> anyhow::Result<AppState> {
    use anyhow::Context;
    config.check()?;
    std::fs::create_dir_all(&config.data_dir)?;
    // Every change that alters an answer is told to the other servers on this database.
    let notify = crate::infra::notify::Publisher::spawn(db.clone());
    let keys = crate::infra::keystore::KeyStore::open(
        &db,
        &config.data_dir,
        &config.key_passphrase,
        notify.clone(),
    )
    .await
    .context("loading the signing keys and the key list")?;
    let jwt = crate::infra::jwt::JwtKeys::open(&db, &config.data_dir, &config.key_passphrase)
        .await
        .context("loading the session-token secret")?;
    let registry = registry::Registry::new(&config)?;
    let checkins = resolve::Checkins::spawn(
        db.clone(),
        std::time::Duration::from_millis(config.checkin_flush_ms.max(10)),
    );
    use crate::infra::ratelimit::Rate;
    let limits = crate::infra::ratelimit::Limits::new(
        Rate {
            burst: config.device_burst,
            per_second: config.device_rate,
        },
        Rate {
            burst: config.enroll_burst,
            per_second: config.enroll_rate,
        },
        Rate {
            burst: config.enroll_product_burst,
            per_second: config.enroll_product_rate,
        },
    );
    let revocations =
        crate::infra::revocations::Revocations::spawn_with(db.clone(), notify.clone()).await?;
    let state = AppState::new(Inner {
        db,
        config,
        keys,
        jwt,
        registry,
        metrics: Default::default(),
        cache: resolve::Cache::new(notify.clone()),
        checkins,
        answers: Default::default(),
        limits,
        revocations,
        transfer: Default::default(),
        clock: Default::default(),
    });
    let weak = Arc::downgrade(&state.0);
    crate::infra::notify::listen(&state.db, &notify, move |event| {
        let Some(inner) = weak.upgrade() else {
            return false;
        };
        on_change(AppState(inner), event);
        true
    })
    .await;
    // Reloads the keys as a safety net for a missed notification, and renews
    // the key list at half its life even if no server restarts: one server
    // of all (an advisory lock), the others reload when told.
    let weak = Arc::downgrade(&state.0);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 1u64.. {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let done = if n % 60 == 0 {
                inner.keys.renew(&inner.db).await.map(|_| ())
            } else {
                inner.keys.reload(&inner.db).await
            };
            if let Err(e) = done {
                tracing::warn!(error = %e, "reloading or renewing the key list failed; will retry");
            }
        }
    });
    Ok(state)
}

/// What this server does when another one changed something.
fn on_change(state: AppState, event: crate::infra::notify::Event) {
    use crate::infra::notify::{Change, Event};
    state
        .metrics
        .notifications
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (keys, devices) = match event {
        Event::Changed(Change::Product(p)) => {
            state.cache.invalidate_here(&p);
            (false, false)
        }
        Event::Changed(Change::Keys) => (true, false),
        Event::Changed(Change::Devices) => (false, true),
        Event::Missed => {
            state.cache.expire_all();
            (true, true)
        }
    };
    if keys || devices {
        tokio::spawn(async move {
            if keys && let Err(e) = state.keys.reload(&state.db).await {
                tracing::warn!(error = %e, "reloading the keys another server changed failed");
            }
            if devices && let Err(e) = state.revocations.reload().await {
                tracing::warn!(error = %e, "reloading the device revocations failed");
            }
        });
    }
}

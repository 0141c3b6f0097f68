//! The HTTP server: routes, authentication, credits and rate limits, and the start/stop of
//! the worker pool.

use crate::error::ApiError;
use crate::keys::{KeyConfig, RateLimiter};
use crate::log;
use crate::metrics::Metrics;
use crate::postgres::{PostgresOptions, PostgresStore};
use crate::request::{ImageInput, parse_request};
use crate::sqlite::SqliteStore;
use crate::store::{JobRecord, JobStatus, JobStore, NewJob, StoreError};
use crate::worker::{Events, PipelineFactory, Workers};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flux_pipeline::image_io::{self, FetchPolicy};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The one model this server serves.
pub const MODEL: &str = "flux-img2img";

/// Largest request body parsed on the request's own task rather than the blocking pool.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Where jobs are kept.
#[derive(Clone, Debug, Default)]
pub enum StoreChoice {
    /// The embedded SQLite database `jobs.sqlite3` in the data dir (one machine).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by any number of API nodes and workers.
    Postgres {
        /// Connection URL (`postgres://user@host:port/db`).
        url: String,
        /// Pool size, lease, attempts, reconnect time.
        options: PostgresOptions,
    },
}

impl StoreChoice {
    /// Reads `--store`: `sqlite` (or empty) or a `postgres://` / `postgresql://` URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("sqlite") {
            Ok(Self::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self::Postgres {
                url: s.to_string(),
                options: PostgresOptions::default(),
            })
        } else {
            Err(format!(
                "store '{s}': expected 'sqlite' or a PostgreSQL URL (postgres://user@host:port/database)"
            ))
        }
    }

    /// Whether several nodes can share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    /// A name for logs, without credentials.
    pub fn describe(&self, data_dir: &std::path::Path) -> String {
        match self {
            Self::Sqlite => format!("SQLite in {}", data_dir.display()),
            Self::Postgres { url, .. } => {
                let host = url
                    .split_once('@')
                    .map_or(url.as_str(), |(_, rest)| rest)
                    .trim_start_matches("postgres://")
                    .trim_start_matches("postgresql://");
                format!("PostgreSQL at {host}")
            }
        }
    }

    /// Opens the store (creating the data dir or running the migrations).
    pub async fn open(&self, data_dir: &std::path::Path) -> Result<Arc<dyn JobStore>, ServeError> {
        match self {
            Self::Sqlite => {
                std::fs::create_dir_all(data_dir).map_err(|e| {
                    ServeError::Config(format!(
                        "cannot create data dir {}: {e}",
                        data_dir.display()
                    ))
                })?;
                let db = data_dir.join("jobs.sqlite3");
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db))
                    .await
                    .map_err(|e| ServeError::Config(e.to_string()))??;
                Ok(Arc::new(store))
            }
            Self::Postgres { url, options } => Ok(Arc::new(
                PostgresStore::connect_with(url, options.clone()).await?,
            )),
        }
    }
}

/// What a `flux serve` node does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// HTTP and workers in one process (one machine).
    #[default]
    All,
    /// HTTP only; `flux worker` processes run the jobs (needs a shared store).
    Api,
}

impl Role {
    /// Reads `--role`: `all` or `api`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "api" => Ok(Self::Api),
            other => Err(format!(
                "role '{other}': expected 'all' (HTTP and workers) or 'api' (HTTP only)"
            )),
        }
    }
}

/// Why a role needs a shared store.
pub(crate) const SHARED_STORE_NEEDED: &str = "the SQLite store belongs to one machine (one file \
     that one process opens), so separate API and worker processes need the PostgreSQL store: \
     give --store postgres://user@host:port/database (or FLUX_STORE)";

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Folder of the job database (the SQLite store).
    pub data_dir: PathBuf,
    /// Where jobs are kept.
    pub store: StoreChoice,
    /// HTTP and workers, or HTTP only.
    pub role: Role,
    /// Worker threads (each with its own loaded model); none in the `api` role.
    pub workers: usize,
    /// Accepted API keys.
    pub keys: Vec<KeyConfig>,
    /// Accept requests without a key.
    pub no_auth: bool,
    /// Base of the URLs in answers (`https://host/prefix`); `None`: from the request's Host.
    pub public_url: Option<String>,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// How image URLs are fetched.
    pub fetch: FetchPolicy,
    /// Most jobs waiting before submissions get 429.
    pub max_queue: u64,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long a synchronous (v1) request waits for its job.
    pub sync_timeout: Duration,
}

impl Config {
    /// Defaults for `addr` and `data_dir`: 1 worker, no keys, 1 hour retention, the default
    /// fetch policy, 1000 queued jobs, 32 MiB bodies, 10 minute synchronous wait.
    pub fn new(addr: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            addr,
            data_dir,
            store: StoreChoice::Sqlite,
            role: Role::All,
            workers: 1,
            keys: Vec::new(),
            no_auth: false,
            public_url: None,
            retention: Duration::from_hours(1),
            fetch: FetchPolicy::default(),
            max_queue: 1000,
            max_body_bytes: 32 * 1024 * 1024,
            sync_timeout: Duration::from_mins(10),
        }
    }
}

/// An error starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad settings.
    #[error("{0}")]
    Config(String),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A worker could not load its model.
    #[error("cannot load the model: {0}")]
    Model(String),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct App {
    store: Arc<dyn JobStore>,
    keys: HashMap<String, KeyConfig>,
    no_auth: bool,
    limiter: RateLimiter,
    public_url: Option<String>,
    fetch: FetchPolicy,
    max_queue: u64,
    max_body_bytes: usize,
    sync_timeout: Duration,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    workers: usize,
    demo: bool,
    role: Role,
}

/// Who is calling, and the credits header to send back.
#[derive(Clone, Debug, Default)]
struct Caller {
    key: Option<String>,
    quota: Option<u64>,
    remaining: Option<u64>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn store_error(e: &StoreError) -> ApiError {
    match e {
        StoreError::QueueFull(n) => ApiError::too_many(
            format!("the queue is full ({n} jobs waiting); retry later"),
            5,
        ),
        other => ApiError::internal(other.to_string()),
    }
}

impl App {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let given = headers.get("x-api-key").map(HeaderValue::to_str);
        let key = match given {
            None if self.no_auth => return Ok(Caller::default()),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing x-api-key header",
                ));
            }
            Some(Err(_)) => {
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key"));
            }
            Some(Ok(k)) => k,
        };
        let Some(cfg) = self.keys.get(key) else {
            if self.no_auth {
                return Ok(Caller::default());
            }
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key"));
        };
        let remaining = match cfg.quota {
            Some(q) => Some(
                self.store
                    .credits_left(key, q)
                    .await
                    .map_err(|e| store_error(&e))?,
            ),
            None => None,
        };
        Ok(Caller {
            key: Some(key.to_string()),
            quota: cfg.quota,
            remaining,
        })
    }

    /// Takes a request token of the caller's key: in the shared store when there is one (so
    /// the limit holds across API nodes), else in this process's memory.
    async fn rate_limit(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some((key, rate)) = caller
            .key
            .as_ref()
            .and_then(|k| Some((k, self.keys.get(k)?.rate?)))
        else {
            return Ok(());
        };
        let taken = if self.store.shared() {
            self.store
                .take_rate_token(key, rate)
                .await
                .map_err(|e| store_error(&e))?
        } else {
            self.limiter.check(key, rate)
        };
        taken.map_err(|secs| {
            ApiError::too_many(
                format!("rate limit of {rate} requests per second exceeded"),
                secs,
            )
        })
    }

    /// Waits until job `id` leaves QUEUED/PROCESSING, or `sync_timeout` passes (`false`).
    async fn wait_finished(&self, caller: &Caller, id: &str) -> Result<bool, ApiError> {
        let Some(changes) = self.store.changes() else {
            // One process: its own workers say when the job is done.
            let rx = self.events.watch(id);
            // The job may have finished before the watch was registered.
            let rec = self.job_for(caller, id).await?;
            if !matches!(rec.status, JobStatus::Queued | JobStatus::Processing) {
                self.events.unwatch(id);
                return Ok(true);
            }
            let waited = tokio::time::timeout(self.sync_timeout, async {
                tokio::select! {
                    _ = rx => {},
                    () = self.events.stopped() => {},
                }
            })
            .await;
            self.events.unwatch(id);
            return Ok(waited.is_ok());
        };
        // A shared store: a worker anywhere finishes the job. Wake on its notice, and poll
        // with back-off in case a notice is lost (listener reconnecting).
        let mut finished = changes.finished();
        let deadline = tokio::time::Instant::now() + self.sync_timeout;
        let mut poll = Duration::from_millis(100);
        loop {
            let rec = self.job_for(caller, id).await?;
            if !matches!(rec.status, JobStatus::Queued | JobStatus::Processing) {
                return Ok(true);
            }
            if self.events.is_shutting_down() {
                return Ok(true);
            }
            let until = (tokio::time::Instant::now() + poll).min(deadline);
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            let notice = async {
                loop {
                    match finished.recv().await {
                        Ok(done) if done == id || done.is_empty() => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            };
            tokio::select! {
                () = notice => {},
                () = tokio::time::sleep_until(until) => {
                    poll = (poll * 2).min(Duration::from_secs(2));
                },
                () = self.events.stopped() => {},
            }
        }
    }

    fn check_model(&self, caller: &Caller, model: &str) -> Result<(), ApiError> {
        if model != MODEL {
            return Err(ApiError::not_found(format!(
                "unknown model '{model}': this server serves {MODEL}"
            )));
        }
        if let Some(cfg) = caller.key.as_ref().and_then(|k| self.keys.get(k))
            && !cfg.allows(model)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this API key is not allowed to use {model}"),
            ));
        }
        Ok(())
    }

    async fn charge(&self, caller: &mut Caller) -> Result<(), ApiError> {
        if let (Some(key), Some(quota)) = (&caller.key, caller.quota) {
            let left = self
                .store
                .charge(key, quota)
                .await
                .map_err(|e| store_error(&e))?;
            caller.remaining = Some(left.unwrap_or(0));
            if left.is_none() {
                return Err(ApiError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    "Not enough credits",
                ));
            }
        }
        Ok(())
    }

    fn base_url(&self, headers: &HeaderMap) -> String {
        if let Some(u) = &self.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        format!("http://{host}")
    }

    /// Validates, fetches the image, charges a credit and stores the job.
    async fn submit(
        &self,
        caller: &mut Caller,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<String, ApiError> {
        let body = body.map_err(|r| body_error(&r, self.max_body_bytes))?;
        // A small body parses in microseconds: on this task, sparing the hand-off to the
        // blocking pool and back. Large ones (megabytes of base64) go there, so as not to
        // hold up the other requests of this runtime thread.
        let req = if body.len() <= INLINE_PARSE_BYTES {
            parse_request(&body)?
        } else {
            tokio::task::spawn_blocking(move || parse_request(&body))
                .await
                .map_err(|e| ApiError::internal(format!("request parsing failed: {e}")))??
        };
        let image = match req.image {
            ImageInput::Bytes(b) => b,
            ImageInput::Url(url) => {
                let policy = self.fetch.clone();
                tokio::task::spawn_blocking(move || {
                    let bytes = image_io::fetch_url(&url, &policy)?;
                    crate::request::check_image(&bytes, &url)?;
                    Ok(bytes)
                })
                .await
                .map_err(|e| ApiError::internal(format!("image download failed: {e}")))?
                .map_err(|e| ApiError::image(&e))?
            }
        };
        self.charge(caller).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let job = NewJob {
            id: id.clone(),
            key: caller.key.clone(),
            params: req.params,
            image,
            created_at: unix_now(),
        };
        self.store
            .submit(job, self.max_queue)
            .await
            .map_err(|e| store_error(&e))?;
        self.metrics.transition("QUEUED");
        log::line(&format!("job {id} QUEUED"));
        self.events.job_queued();
        Ok(id)
    }

    async fn job_for(&self, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
        let rec = self.store.get(id).await.map_err(|e| store_error(&e))?;
        match rec {
            Some(r) if r.key.is_none() || r.key == caller.key => Ok(r),
            _ => Err(ApiError::not_found(format!(
                "unknown request id '{id}' (or its result has expired)"
            ))),
        }
    }

    fn result_body(
        &self,
        rec: &JobRecord,
        headers: &HeaderMap,
        output: Option<&str>,
    ) -> serde_json::Value {
        let queue_time = rec.started_at.map(|s| (s - rec.created_at).max(0.0));
        json!({
            "request_id": rec.id,
            "status": rec.status.name(),
            "output": output,
            "metrics": {
                "inference_time": rec.inference_time,
                "queue_time": queue_time,
            },
            "metadata": {
                "model": if rec.demo { "demo (built-in test model with generated weights; not a real Flux model)" } else { "flux" },
                "demo": rec.demo,
                "image_format": rec.params.image_format,
                "seed": rec.params.seed,
                "steps": rec.params.steps,
                "attempts": rec.attempts,
            },
            "response_url": format!("{}/v2/requests/{}", self.base_url(headers), rec.id),
        })
    }
}

fn body_error(r: &BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    } else {
        ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
    }
}

fn with_credits(mut resp: Response, caller: &Caller) -> Response {
    if let Some(n) = caller.remaining {
        resp.headers_mut()
            .insert("x-remaining-credits", HeaderValue::from(n));
    }
    resp
}

fn answer(caller: &Caller, r: Result<Response, ApiError>) -> Response {
    with_credits(r.unwrap_or_else(IntoResponse::into_response), caller)
}

async fn submit_v2(
    State(app): State<Arc<App>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut caller = match app.authenticate(&headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = async {
        app.rate_limit(&caller).await?;
        app.check_model(&caller, &model)?;
        let id = app.submit(&mut caller, body).await?;
        let base = app.base_url(&headers);
        Ok(axum::Json(json!({
            "request_id": id,
            "status": "QUEUED",
            "status_url": format!("{base}/v2/requests/{id}/status"),
            "response_url": format!("{base}/v2/requests/{id}"),
        }))
        .into_response())
    }
    .await;
    answer(&caller, result)
}

async fn run_v1(
    State(app): State<Arc<App>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut caller = match app.authenticate(&headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = async {
        app.rate_limit(&caller).await?;
        app.check_model(&caller, &model)?;
        let id = app.submit(&mut caller, body).await?;
        if !app.wait_finished(&caller, &id).await? {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the job did not finish within {:?}; it continues as request {id} (GET /v2/requests/{id})", app.sync_timeout),
            ));
        }
        let rec = app.job_for(&caller, &id).await?;
        match rec.status {
            JobStatus::Completed => {
                let bytes = app
                    .store
                    .output(&id)
                    .await
                    .map_err(|e| store_error(&e))?
                    .ok_or_else(|| ApiError::internal("the output image is missing"))?;
                let format = rec.params.format();
                if rec.params.base64 {
                    let mut body = app.result_body(&rec, &headers, None);
                    body["image"] = json!(image_io::to_base64(&bytes));
                    Ok(axum::Json(body).into_response())
                } else {
                    let mut resp = (StatusCode::OK, bytes).into_response();
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(format.mime()));
                    resp.headers_mut().insert(
                        "x-request-id",
                        HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("")),
                    );
                    Ok(resp)
                }
            }
            JobStatus::Failed => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                rec.error.unwrap_or_else(|| "the job failed".into()),
            )),
            JobStatus::Queued | JobStatus::Processing => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the server is shutting down; the job was kept as request {id}"),
            )),
        }
    }
    .await;
    answer(&caller, result)
}

async fn status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match app.authenticate(&headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = async {
        app.rate_limit(&caller).await?;
        let rec = app.job_for(&caller, &id).await?;
        let mut body = json!({ "request_id": rec.id, "status": rec.status.name() });
        match rec.status {
            JobStatus::Processing => {
                body["progress"] = json!({
                    "step": rec.step,
                    "total": rec.total_steps,
                    "message": format!("step {} of {}", rec.step, rec.total_steps),
                });
            }
            JobStatus::Failed => {
                body["error"] = json!(rec.error);
                return Ok((StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response());
            }
            JobStatus::Queued | JobStatus::Completed => {}
        }
        Ok(axum::Json(body).into_response())
    }
    .await;
    answer(&caller, result)
}

async fn result(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match app.authenticate(&headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = async {
        app.rate_limit(&caller).await?;
        let rec = app.job_for(&caller, &id).await?;
        match rec.status {
            JobStatus::Completed => {
                let output = if rec.params.base64 {
                    let bytes = app
                        .store
                        .output(&id)
                        .await
                        .map_err(|e| store_error(&e))?
                        .ok_or_else(|| ApiError::internal("the output image is missing"))?;
                    image_io::to_base64(&bytes)
                } else {
                    format!("{}/v2/requests/{id}/output", app.base_url(&headers))
                };
                Ok(axum::Json(app.result_body(&rec, &headers, Some(&output))).into_response())
            }
            JobStatus::Failed => {
                let mut body = app.result_body(&rec, &headers, None);
                body["error"] = json!(rec.error);
                Ok((StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response())
            }
            JobStatus::Queued | JobStatus::Processing => {
                Ok(axum::Json(app.result_body(&rec, &headers, None)).into_response())
            }
        }
    }
    .await;
    answer(&caller, result)
}

/// The output image itself (the URL given in `output`; the unguessable id is the credential,
/// so that the URL works where the key cannot be sent, e.g. an `<img>` tag).
async fn output(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let result = async {
        let rec = app
            .store
            .get(&id)
            .await
            .map_err(|e| store_error(&e))?
            .filter(|r| r.status == JobStatus::Completed)
            .ok_or_else(|| ApiError::not_found(format!("no output for request id '{id}'")))?;
        let bytes = app
            .store
            .output(&id)
            .await
            .map_err(|e| store_error(&e))?
            .ok_or_else(|| ApiError::not_found(format!("no output for request id '{id}'")))?;
        let mut resp = (StatusCode::OK, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(rec.params.format().mime()),
        );
        Ok::<_, ApiError>(resp)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    match app.store.counts().await {
        Ok(c) => axum::Json(json!({
            "status": "ok",
            "role": match app.role { Role::All => "all", Role::Api => "api" },
            "workers": app.workers,
            "demo_model": app.demo,
            "queue_depth": c.queued,
        }))
        .into_response(),
        Err(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match app.store.counts().await {
        Ok(c) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            app.metrics.render(c, app.workers),
        )
            .into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "unknown route: the API serves POST /v1/flux-img2img, POST /v2/flux-img2img and GET /v2/requests/{id}[/status]",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

async fn log_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    app.metrics.request(status);
    log::line(&format!(
        "{method} {path} {status} {:.1}ms",
        start.elapsed().as_secs_f64() * 1000.0
    ));
    resp
}

/// A started server: its address, and the future that runs it until shutdown.
pub struct Server {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    workers: Option<Workers>,
    retention: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store (`config.store`), re-queues jobs left PROCESSING by a previous run
    /// (SQLite) or whose lease ran out (PostgreSQL), loads the workers' models (`all` role)
    /// and binds the address. Must run inside a tokio runtime.
    pub async fn start(config: Config, factory: PipelineFactory) -> Result<Self, ServeError> {
        if config.keys.is_empty() && !config.no_auth {
            return Err(ServeError::Config(
                "no API key configured: give --api-key, --api-keys-file or FLUX_API_KEY, or --no-auth to accept requests without one".into(),
            ));
        }
        if config.role == Role::Api && !config.store.is_shared() {
            return Err(ServeError::Config(format!(
                "--role api serves HTTP only, with `flux worker` processes running the jobs; {SHARED_STORE_NEEDED}"
            )));
        }
        let store = config.store.open(&config.data_dir).await?;
        log::line(&format!(
            "job store: {}",
            config.store.describe(&config.data_dir)
        ));
        let requeued = store.recover().await?;
        if requeued > 0 {
            log::line(&format!(
                "re-queued {requeued} job(s) left PROCESSING by a stopped worker"
            ));
        }
        let events = Arc::new(Events::default());
        let metrics = Arc::new(Metrics::default());
        let workers = if config.role == Role::All {
            let workers =
                Workers::spawn(config.workers, factory, &store, &events, &metrics).await?;
            if workers.demo {
                log::line(
                    "no model configured: serving the built-in DEMO model (generated weights, not a real Flux model); results say so in their metadata",
                );
            }
            Some(workers)
        } else {
            None
        };
        let listener = bind(config.addr)?;
        let addr = listener.local_addr()?;
        let mut keys = HashMap::new();
        for k in config.keys {
            keys.insert(k.key.clone(), k);
        }
        let app = Arc::new(App {
            store,
            keys,
            no_auth: config.no_auth,
            limiter: RateLimiter::default(),
            public_url: config.public_url,
            fetch: config.fetch,
            max_queue: config.max_queue,
            max_body_bytes: config.max_body_bytes,
            sync_timeout: config.sync_timeout,
            events,
            metrics,
            workers: workers.as_ref().map_or(0, Workers::len),
            demo: workers.as_ref().is_some_and(|w| w.demo),
            role: config.role,
        });
        Ok(Self {
            addr,
            app,
            listener,
            workers,
            retention: config.retention,
        })
    }

    /// The router (exposed for tests that drive it without a socket).
    fn router(app: &Arc<App>) -> Router {
        Router::new()
            .route("/v1/{model}", post(run_v1))
            .route("/v2/{model}", post(submit_v2))
            .route("/v2/requests/{id}/status", get(status))
            .route("/v2/requests/{id}/output", get(output))
            .route("/v2/requests/{id}", get(result))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(openapi))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(app.max_body_bytes))
            .layer(middleware::from_fn_with_state(
                Arc::clone(app),
                log_requests,
            ))
            .with_state(Arc::clone(app))
    }

    /// Serves until `shutdown` resolves, then stops taking requests, lets workers cancel and
    /// re-queue their jobs, finishes in-flight answers and waits for the workers.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let app = self.app;
        log::line(&format!(
            "listening on http://{} with {} worker(s)",
            self.addr, app.workers
        ));
        let purge_app = Arc::clone(&app);
        let retention = self.retention;
        let purger = tokio::spawn(async move {
            let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_mins(1));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let before = unix_now() - retention.as_secs_f64();
                match purge_app.store.purge(before).await {
                    Ok(0) => {}
                    Ok(n) => log::line(&format!(
                        "purged {n} finished job(s) older than {retention:?}"
                    )),
                    Err(e) => log::line(&format!("purge failed: {e}")),
                }
            }
        });
        let events = Arc::clone(&app.events);
        let signal = async move {
            shutdown.await;
            log::line("shutting down: in-flight jobs are re-queued");
            events.shutdown();
        };
        let router = Self::router(&app);
        let served = axum::serve(self.listener, router)
            .with_graceful_shutdown(signal)
            .await;
        purger.abort();
        app.events.shutdown();
        if let Some(workers) = self.workers {
            let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        }
        log::line("stopped");
        served.map_err(ServeError::Io)
    }
}

/// Connections waiting to be accepted. The default of 128 overflows when a few hundred
/// clients connect at once to a busy node, and each connection refused costs its client a
/// SYN retransmission (one second); the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// [`LISTEN_BACKLOG`].
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

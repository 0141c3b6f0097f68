//! `flux serve`: the HTTP job API (see the flux-api crate).

use crate::img2img::{ModelArgs, load_pipeline};
use anyhow::{Context, Result};
use clap::Args;
use flux_api::keys::{KeyConfig, load_keys_file, parse_key_line};
use flux_api::{Config, PipelineFactory, Role, Server, StoreChoice};
use flux_pipeline::image_io::FetchPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where jobs are kept, shared by `flux serve` and `flux worker`.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Job store: `sqlite` (a database in --data-dir, one machine) or a PostgreSQL URL
    /// (`postgres://user:password@host:port/database`) shared by many API nodes and workers.
    #[arg(long, env = "FLUX_STORE", default_value = "sqlite")]
    pub store: String,
    /// PostgreSQL store: seconds a claimed job stays with its worker without a heartbeat;
    /// after that it is queued again (workers heart-beat every third of it).
    #[arg(long, env = "FLUX_LEASE_SECS", default_value_t = 60.0)]
    pub lease_secs: f64,
    /// PostgreSQL store: runs a job may start before a lost lease fails it.
    #[arg(long, env = "FLUX_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u64,
    /// PostgreSQL store: most connections per process.
    #[arg(long, env = "FLUX_PG_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
}

impl StoreArgs {
    /// The store these arguments name.
    pub fn choice(&self) -> Result<StoreChoice> {
        let mut choice =
            StoreChoice::parse(&self.store).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        if let StoreChoice::Postgres { options, .. } = &mut choice {
            if !(self.lease_secs.is_finite() && self.lease_secs > 0.0) {
                anyhow::bail!(
                    "--lease-secs {}: expected a positive number of seconds",
                    self.lease_secs
                );
            }
            options.lease = Duration::from_secs_f64(self.lease_secs);
            options.max_attempts = self.max_attempts;
            options.pool_size = self.pool_size;
        }
        Ok(choice)
    }
}

/// Arguments of `flux serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free one).
    #[arg(long, env = "FLUX_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// Folder of the job database (created if missing); needed by the SQLite store.
    #[arg(long, env = "FLUX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// `all`: HTTP and workers in this process; `api`: HTTP only, with `flux worker`
    /// processes running the jobs (needs the PostgreSQL store).
    #[arg(long, env = "FLUX_ROLE", default_value = "all")]
    pub role: String,
    /// Worker threads, each with its own loaded model (`all` role).
    #[arg(long, env = "FLUX_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// An accepted API key, optionally with limits: `KEY [quota=N] [rate=N/s]` (repeatable;
    /// the environment variable takes a comma-separated list).
    #[arg(long = "api-key", env = "FLUX_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// A file with one key per line: `KEY [quota=N] [rate=N/s] [models=a,b]`; `#` comments.
    #[arg(long, env = "FLUX_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Base URL used in status_url, response_url and output URLs (default: from the request's
    /// Host header).
    #[arg(long, env = "FLUX_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// How long finished jobs and their images are kept, in seconds.
    #[arg(long, env = "FLUX_RETENTION_SECS", default_value_t = 3600)]
    pub retention_secs: u64,
    /// Accept requests without an API key.
    #[arg(long, env = "FLUX_NO_AUTH")]
    pub no_auth: bool,
    /// Allow image URLs that resolve to loopback, private or link-local addresses (for local
    /// use only: a public server must not fetch from its own network).
    #[arg(long, env = "FLUX_ALLOW_PRIVATE_URLS")]
    pub allow_private_urls: bool,
    /// Most queued jobs before submissions are answered 429.
    #[arg(long, env = "FLUX_MAX_QUEUE", default_value_t = 1000)]
    pub max_queue: u64,
    /// Largest request body, in bytes.
    #[arg(long, env = "FLUX_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Timeout of image URL downloads, in seconds.
    #[arg(long, env = "FLUX_FETCH_TIMEOUT_SECS", default_value_t = 30)]
    pub fetch_timeout_secs: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<()> {
    let mut keys: Vec<KeyConfig> = Vec::new();
    for k in &args.api_keys {
        keys.push(parse_key_line(k).map_err(|e| anyhow::anyhow!("--api-key: {e}"))?);
    }
    if let Some(f) = &args.api_keys_file {
        keys.extend(load_keys_file(f)?);
    }
    let store = args.store.choice()?;
    let role = Role::parse(&args.role).map_err(|e| anyhow::anyhow!("--role: {e}"))?;
    let data_dir = match (&args.data_dir, &store) {
        (Some(d), _) => d.clone(),
        // No database file here (an API-only node on SQLite is refused by the server, which
        // explains why).
        (None, StoreChoice::Postgres { .. }) => PathBuf::from("."),
        (None, StoreChoice::Sqlite) if role == Role::Api => PathBuf::from("."),
        (None, StoreChoice::Sqlite) => anyhow::bail!(
            "--data-dir (or FLUX_DATA_DIR) is required with the SQLite store: the folder of its database"
        ),
    };
    let mut config = Config::new(args.addr, data_dir);
    config.store = store;
    config.role = role;
    config.workers = args.workers.max(1);
    config.keys = keys;
    config.no_auth = args.no_auth;
    config.public_url.clone_from(&args.public_url);
    config.retention = Duration::from_secs(args.retention_secs);
    config.fetch = FetchPolicy {
        timeout: Duration::from_secs(args.fetch_timeout_secs.max(1)),
        allow_private: args.allow_private_urls,
        ..FetchPolicy::default()
    };
    config.max_queue = args.max_queue;
    config.max_body_bytes = args.max_body_bytes;
    let factory = pipeline_factory(&args.model);
    let rt = runtime()?;
    rt.block_on(async move {
        let server = Server::start(config, factory).await?;
        // Printed on stdout so scripts (and tests) can read the bound port.
        println!("listening on http://{}", server.addr);
        server.run(flux_api::shutdown_signal()).await
    })?;
    Ok(())
}

/// Loads the configured model (or the demo model) once per worker.
pub(crate) fn pipeline_factory(model: &ModelArgs) -> PipelineFactory {
    let model = model.clone();
    Arc::new(move || load_pipeline(&model).map_err(|e| format!("{e:#}")))
}

/// The multi-threaded async runtime the HTTP server and the job store run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

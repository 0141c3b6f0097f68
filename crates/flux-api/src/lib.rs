//! The HTTP job API: Flux.1 img2img served as the hosted API serves it, so its clients work by
//! changing only their base URL.
//!
//! * [`request`]: parsing and validating request bodies ([`parse_request`], pure).
//! * [`store`]: the [`JobStore`] trait; [`sqlite`]: the embedded SQLite store.
//! * [`worker`]: worker threads, each with a model loaded once.
//! * [`server`]: routes, keys, credits, rate limits, start-up and graceful shutdown.
//! * [`keys`]: API keys and the keys file format.

pub mod error;
pub mod keys;
pub mod log;
pub mod metrics;
pub mod openapi;
pub mod postgres;
pub mod request;
pub mod server;
pub mod sqlite;
pub mod store;
pub mod worker;

pub use error::ApiError;
pub use request::{ImageInput, JobParams, ValidatedRequest, parse_request};
pub use server::{Config, MODEL, Role, ServeError, Server, StoreChoice, shutdown_signal};
pub use sqlite::SqliteStore;
pub use store::{JobStatus, JobStore};
pub use worker::{PipelineFactory, factory, run_node};

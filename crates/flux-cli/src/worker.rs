//! `flux worker`: runs queued jobs from a shared (PostgreSQL) job store, without HTTP; API
//! nodes (`flux serve --role api`) take the requests.

use crate::img2img::{ModelArgs, load_pipeline};
use crate::serve::StoreArgs;
use anyhow::{Context, Result};
use clap::Args;
use flux_api::PipelineFactory;
use std::sync::Arc;

/// Arguments of `flux worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Worker threads, each with its own loaded model.
    #[arg(long, env = "FLUX_WORKERS", default_value_t = 1)]
    pub workers: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs the workers until SIGINT or SIGTERM (in-flight jobs are re-queued).
pub fn run(args: &WorkerArgs) -> Result<()> {
    let store = args.store.choice()?;
    let model = args.model.clone();
    let factory: PipelineFactory =
        Arc::new(move || load_pipeline(&model).map_err(|e| format!("{e:#}")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(flux_api::run_node(
        &store,
        args.workers.max(1),
        factory,
        flux_api::shutdown_signal(),
    ))?;
    Ok(())
}

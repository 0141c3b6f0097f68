//! `flux worker`: runs queued jobs from a shared (PostgreSQL) job store, without HTTP; API
//! nodes (`flux serve --role api`) take the requests.

use crate::img2img::ModelArgs;
use crate::serve::{StoreArgs, pipeline_factory, runtime};
use anyhow::Result;
use clap::Args;

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
    let factory = pipeline_factory(&args.model);
    let rt = runtime()?;
    rt.block_on(flux_api::run_node(
        &store,
        args.workers.max(1),
        factory,
        flux_api::shutdown_signal(),
    ))?;
    Ok(())
}

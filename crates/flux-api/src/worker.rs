//! Worker threads: each loads a pipeline ([`Img2Img`], on its configured backend) once and then
//! runs queued jobs one at a time.
//!
//! In `flux serve` they share the process with the HTTP side; [`run_node`] runs them alone
//! (`flux worker`) against a shared store. With a store whose claims carry a lease, a task
//! extends the lease while the job runs, and a worker whose claim was lost stops the job.

use crate::log;
use crate::metrics::Metrics;
use crate::server::{SHARED_STORE_NEEDED, ServeError, StoreChoice};
use crate::store::{JobRecord, JobStore, RunMetrics};
use flux_pipeline::{Img2Img, PipelineError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Builds the pipeline of one worker (called once per worker, on its thread), on whichever
/// backend it was configured for.
pub type PipelineFactory = Arc<dyn Fn() -> Result<Box<dyn Img2Img>, String> + Send + Sync>;

/// A factory for a pipeline built by `load` (e.g. `Pipeline::demo`), boxed for the workers.
pub fn factory<P, E>(load: impl Fn() -> Result<P, E> + Send + Sync + 'static) -> PipelineFactory
where
    P: Img2Img + 'static,
    E: std::fmt::Display,
{
    Arc::new(move || {
        load()
            .map(|p| Box::new(p) as Box<dyn Img2Img>)
            .map_err(|e| e.to_string())
    })
}

/// Signals between the HTTP side and the workers.
#[derive(Debug)]
pub struct Events {
    shutdown: AtomicBool,
    stopping: tokio::sync::watch::Sender<bool>,
    pending: Mutex<u64>,
    cv: Condvar,
    waiters: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            shutdown: AtomicBool::new(false),
            stopping: tokio::sync::watch::Sender::new(false),
            pending: Mutex::new(0),
            cv: Condvar::new(),
            waiters: Mutex::new(HashMap::new()),
        }
    }
}

impl Events {
    /// Resolves once shutdown has been asked for.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// A job was queued: wake one idle worker.
    pub fn job_queued(&self) {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *p += 1;
        self.cv.notify_one();
    }

    /// Asks workers to stop: idle ones exit, busy ones cancel and re-queue their job.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.stopping.send_replace(true);
        self.cv.notify_all();
    }

    /// Whether shutdown was asked for.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// A receiver told when job `id` leaves PROCESSING (finished or re-queued).
    pub fn watch(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string(), tx);
        rx
    }

    /// Stops watching `id`.
    pub fn unwatch(&self, id: &str) {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    fn notify(&self, id: &str) {
        let tx = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    fn wait_for_work(&self, timeout: Duration) {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *p == 0 && !self.is_shutting_down() {
            p = self
                .cv
                .wait_timeout(p, timeout)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        *p = p.saturating_sub(1);
    }
}

/// The running workers.
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
    /// Whether the workers run the demo model.
    pub demo: bool,
    /// The backend the workers' pipelines run on (the first worker's, as all share one
    /// configuration).
    pub backend: String,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.handles.len())
            .field("demo", &self.demo)
            .field("backend", &self.backend)
            .finish()
    }
}

struct Ctx {
    store: Arc<dyn JobStore>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    rt: Handle,
}

impl Workers {
    /// [`Workers::start`] from async code: `n` workers (at least one) on the current runtime.
    pub async fn spawn(
        n: usize,
        factory: PipelineFactory,
        store: &Arc<dyn JobStore>,
        events: &Arc<Events>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ServeError> {
        let rt = Handle::current();
        let (store, events, metrics) = (Arc::clone(store), Arc::clone(events), Arc::clone(metrics));
        tokio::task::spawn_blocking(move || {
            Self::start(n, &factory, &store, &events, &metrics, &rt)
        })
        .await
        .map_err(|e| ServeError::Model(e.to_string()))?
        .map_err(ServeError::Model)
    }

    /// Starts `n` workers, each loading its pipeline with `factory`; returns once all have
    /// loaded, or with the first load error (after stopping the others).
    pub fn start(
        n: usize,
        factory: &PipelineFactory,
        store: &Arc<dyn JobStore>,
        events: &Arc<Events>,
        metrics: &Arc<Metrics>,
        rt: &Handle,
    ) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::channel::<Result<(bool, String), String>>();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let ctx = Ctx {
                store: Arc::clone(store),
                events: Arc::clone(events),
                metrics: Arc::clone(metrics),
                rt: rt.clone(),
            };
            let factory = Arc::clone(factory);
            let tx = tx.clone();
            let name = format!("worker-{i}");
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let pipeline = match factory() {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(format!("{name}: {e}")));
                            return;
                        }
                    };
                    let _ = tx.send(Ok((pipeline.is_demo(), pipeline.backend_name())));
                    drop(tx);
                    run_worker(&name, pipeline.as_ref(), &ctx);
                })
                .map_err(|e| format!("cannot start worker thread: {e}"))?;
            handles.push(handle);
        }
        drop(tx);
        let mut demo = false;
        let mut backend = String::new();
        for _ in 0..handles.len() {
            match rx.recv() {
                Ok(Ok((d, name))) => {
                    demo |= d;
                    if backend.is_empty() {
                        backend = name;
                    }
                }
                Ok(Err(e)) => {
                    events.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    events.shutdown();
                    return Err("a worker stopped while loading its model".into());
                }
            }
        }
        log::line(&format!(
            "{} worker(s) loaded their model on backend {backend}",
            handles.len()
        ));
        Ok(Self {
            handles,
            demo,
            backend,
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Waits for every worker to exit (call after [`Events::shutdown`]).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// How long an idle worker waits before looking at the queue again without a notice.
const IDLE_POLL: Duration = Duration::from_millis(500);

fn run_worker(name: &str, pipeline: &dyn Img2Img, ctx: &Ctx) {
    while !ctx.events.is_shutting_down() {
        // Subscribed before claiming, so a job queued in between is not missed.
        let mut queued = ctx.store.changes().map(crate::store::Changes::queued);
        match ctx.rt.block_on(ctx.store.claim_next()) {
            Ok(Some((job, claim))) => run_job(name, pipeline, ctx, &job, &claim),
            Ok(None) => match &mut queued {
                // Another node may queue the job: wait for the store's notice.
                Some(rx) => ctx.rt.block_on(async {
                    tokio::select! {
                        _ = rx.changed() => {},
                        () = tokio::time::sleep(IDLE_POLL) => {},
                        () = ctx.events.stopped() => {},
                    }
                }),
                None => ctx.events.wait_for_work(IDLE_POLL),
            },
            Err(e) => {
                log::line(&format!("{name}: cannot claim a job: {e}"));
                ctx.rt.block_on(async {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {},
                        () = ctx.events.stopped() => {},
                    }
                });
            }
        }
    }
}

/// Extends the lease of a running job every third of the lease, until aborted; sets `lost`
/// when the claim no longer holds (the job was re-queued after a missed lease).
fn start_heartbeat(
    ctx: &Ctx,
    id: &str,
    claim: &str,
    lost: &Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let lease = ctx.store.lease()?;
    let every = (lease / 3).max(Duration::from_millis(10));
    let (store, id, claim, lost) = (
        Arc::clone(&ctx.store),
        id.to_string(),
        claim.to_string(),
        Arc::clone(lost),
    );
    Some(ctx.rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match store.heartbeat(&id, &claim).await {
                Ok(true) => {}
                Ok(false) => {
                    lost.store(true, Ordering::SeqCst);
                    log::line(&format!(
                        "job {id}: the claim no longer holds (lease ran out); stopping it"
                    ));
                    break;
                }
                Err(e) => log::line(&format!("job {id}: heartbeat failed: {e}")),
            }
        }
    }))
}

fn run_job(name: &str, pipeline: &dyn Img2Img, ctx: &Ctx, job: &JobRecord, claim: &str) {
    let id = job.id.as_str();
    ctx.metrics.transition("PROCESSING");
    log::line(&format!(
        "job {id} PROCESSING on {name} (attempt {})",
        job.attempts
    ));
    let lost = Arc::new(AtomicBool::new(false));
    let heartbeat = start_heartbeat(ctx, id, claim, &lost);
    let result = prepare_and_run(pipeline, ctx, job, claim, &lost);
    if let Some(h) = heartbeat {
        h.abort();
    }
    let store = &ctx.store;
    match result {
        Ok(out) => {
            let metrics = RunMetrics {
                inference_time: out.total_time.as_secs_f64(),
                demo: out.demo,
            };
            match ctx
                .rt
                .block_on(store.complete(id, claim, out.bytes, metrics))
            {
                Ok(true) => {
                    ctx.metrics.transition("COMPLETED");
                    log::line(&format!(
                        "job {id} COMPLETED in {:.3}s ({} steps)",
                        metrics.inference_time, out.steps_run
                    ));
                }
                Ok(false) => log::line(&format!(
                    "job {id}: result dropped, the job was claimed again"
                )),
                Err(e) => log::line(&format!("job {id}: cannot store the result: {e}")),
            }
        }
        Err(PipelineError::Cancelled { step, total }) if lost.load(Ordering::SeqCst) => {
            log::line(&format!(
                "job {id}: abandoned after step {step} of {total}, it was claimed again"
            ));
        }
        Err(PipelineError::Cancelled { step, total }) if ctx.events.is_shutting_down() => {
            match ctx.rt.block_on(store.requeue(id, claim)) {
                Ok(_) => {
                    ctx.metrics.transition("QUEUED");
                    log::line(&format!(
                        "job {id} QUEUED (re-queued at shutdown after step {step} of {total})"
                    ));
                }
                Err(e) => log::line(&format!("job {id}: cannot re-queue: {e}")),
            }
        }
        Err(e) => {
            let message = e.to_string();
            match ctx.rt.block_on(store.fail(id, claim, &message)) {
                Ok(true) => {
                    ctx.metrics.transition("FAILED");
                    log::line(&format!("job {id} FAILED: {message}"));
                }
                Ok(false) => log::line(&format!(
                    "job {id}: failure dropped, the job was claimed again"
                )),
                Err(se) => log::line(&format!("job {id}: cannot record failure: {se}")),
            }
        }
    }
    ctx.events.notify(id);
}

fn prepare_and_run(
    pipeline: &dyn Img2Img,
    ctx: &Ctx,
    job: &JobRecord,
    claim: &str,
    lost: &AtomicBool,
) -> Result<flux_pipeline::Output, PipelineError> {
    let model = |m: String| PipelineError::Model(m);
    let input = ctx
        .rt
        .block_on(ctx.store.input(&job.id))
        .map_err(|e| model(e.to_string()))?
        .ok_or_else(|| {
            model(format!(
                "job {}: input image missing from the store",
                job.id
            ))
        })?;
    let req = job.params.to_pipeline(input).map_err(model)?;
    let mut last = Instant::now();
    let mut on_step = |p: &flux_pipeline::Progress| {
        let now = Instant::now();
        ctx.metrics.step(now.duration_since(last).as_secs_f64());
        last = now;
        if let Err(e) =
            ctx.rt.block_on(
                ctx.store
                    .progress(&job.id, claim, p.step as u64, p.total as u64),
            )
        {
            log::line(&format!("job {}: cannot record progress: {e}", job.id));
        }
        !ctx.events.is_shutting_down() && !lost.load(Ordering::SeqCst)
    };
    // A panic in the model code fails this job instead of killing the worker.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pipeline.img2img(&req, &mut on_step)
    }))
    .unwrap_or_else(|_| Err(model("internal error: the pipeline panicked".into())))
}

/// Runs `n` workers against a shared store until `shutdown` resolves (`flux worker`): no HTTP,
/// the jobs come from API nodes on other machines. In-flight jobs are re-queued at shutdown.
/// Must run inside a tokio runtime.
pub async fn run_node(
    store: &StoreChoice,
    n: usize,
    factory: PipelineFactory,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if !store.is_shared() {
        return Err(ServeError::Config(format!(
            "flux worker runs jobs queued by separate API nodes; {SHARED_STORE_NEEDED}"
        )));
    }
    let store = store.open(std::path::Path::new(".")).await?;
    let requeued = store.recover().await?;
    if requeued > 0 {
        log::line(&format!(
            "re-queued {requeued} job(s) whose worker stopped heart-beating"
        ));
    }
    let events = Arc::new(Events::default());
    let metrics = Arc::new(Metrics::default());
    let workers = Workers::spawn(n, factory, &store, &events, &metrics).await?;
    log::line(&format!(
        "worker node running {} worker(s){}",
        workers.len(),
        if workers.demo {
            " with the built-in DEMO model (generated weights, not a real Flux model)"
        } else {
            ""
        }
    ));
    shutdown.await;
    log::line("shutting down: in-flight jobs are re-queued");
    events.shutdown();
    let _ = tokio::task::spawn_blocking(move || workers.join()).await;
    log::line("stopped");
    Ok(())
}

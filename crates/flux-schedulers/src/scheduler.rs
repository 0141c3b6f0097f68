//! The sigma schedulers of ComfyUI (`comfy/samplers.py`: `SCHEDULER_HANDLERS`,
//! `calculate_sigmas`, `KSampler.set_steps`), reproduced with ComfyUI's float32 rounding.

use crate::error::ScheduleError;
use crate::model_sampling::ModelSampling;
use crate::torch_f32;
use std::fmt;
use std::str::FromStr;

/// A sigma scheduler, named exactly as in ComfyUI (and the hosted API, which accepts the first seven).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Uniform in timestep between the table's ends, zero appended.
    Normal,
    /// Karras et al. (2022), rho 7, between the table's sigma_min and sigma_max.
    Karras,
    /// Uniform in log sigma between sigma_max and sigma_min.
    Exponential,
    /// As `normal` with `steps + 1` points, the last one replaced by zero.
    SgmUniform,
    /// Evenly spaced entries of the sigma table.
    Simple,
    /// Every `len / steps`-th table entry from index 1 (DDIM's uniform timesteps).
    DdimUniform,
    /// Table entries at the quantiles of Beta(0.6, 0.6) (arXiv:2407.12173).
    Beta,
    /// Mochi's schedule: linear for the first half of the steps, then quadratic.
    LinearQuadratic,
    /// KL-optimal schedule (uniform in arctan sigma).
    KlOptimal,
}

impl Scheduler {
    /// Every scheduler, in ComfyUI's order of exposure in the hosted API (its seven first).
    pub const ALL: [Self; 9] = [
        Self::Normal,
        Self::Karras,
        Self::Exponential,
        Self::SgmUniform,
        Self::Simple,
        Self::DdimUniform,
        Self::Beta,
        Self::LinearQuadratic,
        Self::KlOptimal,
    ];

    /// The scheduler's name, exactly as ComfyUI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::SgmUniform => "sgm_uniform",
            Self::Simple => "simple",
            Self::DdimUniform => "ddim_uniform",
            Self::Beta => "beta",
            Self::LinearQuadratic => "linear_quadratic",
            Self::KlOptimal => "kl_optimal",
        }
    }

    /// A one-line description.
    pub fn description(self) -> &'static str {
        match self {
            Self::Normal => {
                "uniform in timestep between the model's sigma_max and sigma_min, then 0"
            }
            Self::Karras => "Karras et al. 2022 (rho = 7) from sigma_max to sigma_min, then 0",
            Self::Exponential => "uniform in log sigma from sigma_max to sigma_min, then 0",
            Self::SgmUniform => {
                "uniform in timestep over steps + 1 points, the last dropped, then 0"
            }
            Self::Simple => "evenly spaced entries of the model's sigma table, then 0",
            Self::DdimUniform => "every (table length / steps)-th table entry from index 1 (DDIM)",
            Self::Beta => {
                "table entries at Beta(0.6, 0.6) quantiles, repeated entries dropped, then 0"
            }
            Self::LinearQuadratic => {
                "linear for the first half of the steps, then quadratic (Mochi)"
            }
            Self::KlOptimal => "uniform in arctan(sigma) from sigma_max to sigma_min, then 0",
        }
    }

    /// The valid names, comma separated (for error messages).
    pub fn valid_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheduler {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ScheduleError::UnknownScheduler {
                name: s.to_string(),
                valid: Self::valid_names(),
            })
    }
}

/// The largest step count a schedule is computed for (after denoise scaling): far beyond any use,
/// small enough that a typo cannot exhaust memory.
pub const MAX_STEPS: usize = 1_000_000;

/// The schedule of `scheduler` for `steps` steps, as ComfyUI's `calculate_sigmas(model_sampling,
/// scheduler, steps)`: float32 values, descending, normally `steps + 1` long and ending in 0.
///
/// Exceptions, all as in ComfyUI: `steps == 0` gives `[0]` (where ComfyUI does not divide by
/// zero, that is what it returns); `beta` drops
/// repeated table indices so it can be shorter; `ddim_uniform` has `ceil((len - 1) / stride) + 1`
/// entries with stride `len / steps`, which can exceed `steps + 1`; `normal` omits the final 0
/// (with one more step) when the model's sigma at sigma_min is within 1e-5 of 0;
/// `kl_optimal` with one step returns `[NaN, 0]` (a 0/0 in the reference).
pub fn calculate_sigmas(
    scheduler: Scheduler,
    model: &ModelSampling,
    steps: usize,
) -> Result<Vec<f32>, ScheduleError> {
    if steps > MAX_STEPS {
        return Err(ScheduleError::TooManySteps {
            steps: steps as u64,
            max: MAX_STEPS as u64,
        });
    }
    if steps == 0 {
        return Ok(vec![0.0]);
    }
    let sigma_min = model.table()[0];
    let sigma_max = model.table()[model.table().len() - 1];
    Ok(match scheduler {
        Scheduler::Normal => normal(model, steps, false),
        Scheduler::SgmUniform => normal(model, steps, true),
        Scheduler::Karras => karras(steps, f64::from(sigma_min), f64::from(sigma_max)),
        Scheduler::Exponential => exponential(steps, f64::from(sigma_min), f64::from(sigma_max)),
        Scheduler::Simple => simple(model, steps),
        Scheduler::DdimUniform => ddim_uniform(model, steps),
        Scheduler::Beta => beta(model, steps),
        Scheduler::LinearQuadratic => linear_quadratic(sigma_max, steps),
        Scheduler::KlOptimal => kl_optimal(steps, f64::from(sigma_min), f64::from(sigma_max)),
    })
}

/// The step count KSampler computes its schedule for (before the penultimate discard):
/// `steps` at full denoise (`> 0.9999`), `int(steps / denoise)` below, `None` (an empty
/// schedule) at `denoise <= 0`.
fn ksampler_len(steps: usize, denoise: f64) -> Result<Option<usize>, ScheduleError> {
    if denoise.is_nan() {
        return Err(ScheduleError::InvalidDenoise(denoise));
    }
    if denoise > 0.9999 {
        return Ok(Some(steps));
    }
    if denoise <= 0.0 {
        return Ok(None);
    }
    let scaled = steps as f64 / denoise;
    if scaled.is_nan() || scaled > MAX_STEPS as f64 {
        return Err(ScheduleError::TooManySteps {
            steps: if scaled.is_finite() {
                scaled as u64
            } else {
                u64::MAX
            },
            max: MAX_STEPS as u64,
        });
    }
    Ok(Some(scaled as usize))
}

/// Checks, without computing it, that the schedule [`ksampler_sigmas`] gives for these
/// arguments is defined: a denoise that is a number, a scaled step count of at most
/// [`MAX_STEPS`], and no NaN sigma (`kl_optimal` over a single step, which ComfyUI computes as
/// `[NaN, 0]` and samples into a black image). For request validation: a request that passes
/// gets a finite schedule.
pub fn ksampler_check(
    scheduler: Scheduler,
    steps: usize,
    denoise: f64,
    discard_penultimate: bool,
) -> Result<(), ScheduleError> {
    let Some(n) = ksampler_len(steps, denoise)? else {
        return Ok(());
    };
    let computed = n + usize::from(discard_penultimate);
    if computed > MAX_STEPS {
        return Err(ScheduleError::TooManySteps {
            steps: computed as u64,
            max: MAX_STEPS as u64,
        });
    }
    if scheduler == Scheduler::KlOptimal && computed == 1 {
        return Err(ScheduleError::UndefinedSchedule {
            scheduler: scheduler.name(),
            steps: 1,
        });
    }
    Ok(())
}

/// The schedule a ComfyUI `KSampler` runs for `steps` steps at `denoise` strength
/// (`KSampler.set_steps` and `KSampler.calculate_sigmas`).
///
/// `denoise > 0.9999` computes the full schedule; `denoise <= 0` gives an empty one; otherwise the
/// schedule is computed for `int(steps / denoise)` steps and its last `steps + 1` values kept.
/// With `discard_penultimate` (samplers dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2) one more step
/// is computed and the second-to-last sigma removed, before the denoise trimming.
pub fn ksampler_sigmas(
    scheduler: Scheduler,
    model: &ModelSampling,
    steps: usize,
    denoise: f64,
    discard_penultimate: bool,
) -> Result<Vec<f32>, ScheduleError> {
    let compute = |n: usize| -> Result<Vec<f32>, ScheduleError> {
        if discard_penultimate {
            let mut s = calculate_sigmas(scheduler, model, n + 1)?;
            // torch.cat([sigmas[:-2], sigmas[-1:]]) on a schedule of one value keeps it twice.
            if s.len() >= 2 {
                s.remove(s.len() - 2);
            } else if let Some(&last) = s.last() {
                s.push(last);
            }
            Ok(s)
        } else {
            calculate_sigmas(scheduler, model, n)
        }
    };
    let Some(n) = ksampler_len(steps, denoise)? else {
        return Ok(Vec::new());
    };
    if denoise > 0.9999 {
        return compute(n);
    }
    let sigmas = compute(n)?;
    let keep = (steps + 1).min(sigmas.len());
    Ok(sigmas[sigmas.len() - keep..].to_vec())
}

/// `normal_scheduler` (and `sgm_uniform` with `sgm`): linspace in timestep space, converted back.
fn normal(model: &ModelSampling, steps: usize, sgm: bool) -> Vec<f32> {
    let table = model.table();
    let start = model.timestep_f32(table[table.len() - 1]);
    let end = model.timestep_f32(table[0]);
    let mut append_zero = true;
    let timesteps = if sgm {
        let mut t = torch_f32::linspace(start, end, steps + 1);
        t.pop();
        t
    } else {
        let mut n = steps;
        if model.sigma_f32(end).abs() <= 1e-5 {
            n += 1;
            append_zero = false;
        }
        torch_f32::linspace(start, end, n)
    };
    let mut sigmas: Vec<f32> = timesteps.into_iter().map(|t| model.sigma_f32(t)).collect();
    if append_zero {
        sigmas.push(0.0);
    }
    sigmas
}

/// k-diffusion's `get_sigmas_karras` (rho 7) on float32 tensors.
fn karras(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    let slope = (min_inv_rho - max_inv_rho) as f32;
    let offset = max_inv_rho as f32;
    let mut sigmas: Vec<f32> = torch_f32::linspace(0.0f32, 1.0, n)
        .into_iter()
        .map(|r| (offset + r * slope).powf(rho as f32))
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// k-diffusion's `get_sigmas_exponential` on float32 tensors.
fn exponential(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let mut sigmas: Vec<f32> = torch_f32::linspace(sigma_max.ln() as f32, sigma_min.ln() as f32, n)
        .into_iter()
        .map(f32::exp)
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// `simple_scheduler`: table entries `sigmas[-(1 + int(i * len / steps))]`.
fn simple(model: &ModelSampling, steps: usize) -> Vec<f32> {
    let table = model.table();
    let len = table.len();
    let stride = len as f64 / steps as f64;
    let mut sigmas: Vec<f32> = (0..steps)
        .map(|i| table[len - 1 - (i as f64 * stride) as usize])
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// `ddim_scheduler`: every `len / steps`-th entry from index 1, reversed, with a leading 0 unless
/// the table's second entry is already ~0.
fn ddim_uniform(model: &ModelSampling, steps: usize) -> Vec<f32> {
    let table = model.table();
    let len = table.len();
    let mut steps = steps;
    let mut sigmas = Vec::new();
    if len > 1 && f64::from(table[1]).abs() <= 1e-5 {
        steps += 1;
    } else {
        sigmas.push(0.0);
    }
    let stride = (len / steps).max(1);
    sigmas.extend((1..len).step_by(stride).map(|i| table[i]));
    sigmas.reverse();
    sigmas
}

/// `beta_scheduler` with alpha = beta = 0.6: table indices `rint(ppf(1 - i / steps) * (len - 1))`,
/// consecutive repeats dropped.
fn beta(model: &ModelSampling, steps: usize) -> Vec<f32> {
    const ALPHA: f64 = 0.6;
    const BETA: f64 = 0.6;
    let table = model.table();
    let total = (table.len() - 1) as f64;
    let step = 1.0 / steps as f64;
    let mut sigmas = Vec::with_capacity(steps + 1);
    let mut last = None;
    for i in 0..steps {
        let q = 1.0 - i as f64 * step;
        let t = (beta_ppf(q, ALPHA, BETA) * total).round_ties_even();
        if last != Some(t) {
            sigmas.push(table[t as usize]);
        }
        last = Some(t);
    }
    sigmas.push(0.0);
    sigmas
}

/// The quantile function of Beta(a, b) at `q` in [0, 1].
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        0.0
    } else if q >= 1.0 {
        1.0
    } else if a == b && q == 0.5 {
        // The median of a symmetric Beta is exactly 1/2 (scipy returns it exactly); the
        // iterative inverse lands an ulp off, and `0.5 * (len - 1)` is a rounding tie.
        0.5
    } else {
        statrs::function::beta::inv_beta_reg(a, b, q)
    }
}

/// `linear_quadratic_schedule` (threshold_noise 0.025, linear_steps = steps / 2), computed in
/// float64 as Python does, stored as float32 and scaled by the f32 sigma_max.
fn linear_quadratic(sigma_max: f32, steps: usize) -> Vec<f32> {
    const THRESHOLD: f64 = 0.025;
    let schedule: Vec<f64> = if steps == 1 {
        vec![1.0, 0.0]
    } else {
        let linear_steps = steps / 2;
        let ls = linear_steps as f64;
        let mut s: Vec<f64> = (0..linear_steps)
            .map(|i| i as f64 * THRESHOLD / ls)
            .collect();
        let diff = ls - THRESHOLD * steps as f64;
        let quadratic_steps = (steps - linear_steps) as f64;
        let quadratic_coef = diff / (ls * (quadratic_steps * quadratic_steps));
        let linear_coef = THRESHOLD / ls - 2.0 * diff / (quadratic_steps * quadratic_steps);
        let constant = quadratic_coef * (ls * ls);
        s.extend((linear_steps..steps).map(|i| {
            let i = i as f64;
            quadratic_coef * (i * i) + linear_coef * i + constant
        }));
        s.push(1.0);
        s.into_iter().map(|x| 1.0 - x).collect()
    };
    schedule.into_iter().map(|x| x as f32 * sigma_max).collect()
}

/// `kl_optimal_scheduler` on float32 tensors: `tan(w * atan(sigma_min) + (1 - w) * atan(sigma_max))`
/// for `w = arange(n) / (n - 1)`, then 0.
fn kl_optimal(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let atan_min = sigma_min.atan() as f32;
    let atan_max = sigma_max.atan() as f32;
    let denom = n as f32 - 1.0;
    let mut sigmas: Vec<f32> = (0..n)
        .map(|i| {
            let w = i as f32 / denom;
            (w * atan_min + (1.0 - w) * atan_max).tan()
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

//! Errors of schedule computation and model-sampling construction.

/// An invalid scheduler name, model name or schedule parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A scheduler name that is not one of ComfyUI's.
    #[error("unknown scheduler '{name}'; valid schedulers: {valid}")]
    UnknownScheduler {
        /// The name given.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },
    /// A model name without a model-sampling definition.
    #[error("unknown model '{name}'; valid models: {valid}")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The valid names, comma separated.
        valid: String,
    },
    /// A shift override for a model without a time shift, or a non-finite one.
    #[error("invalid shift {shift} for model '{model}': {why}")]
    InvalidShift {
        /// The model name.
        model: String,
        /// The shift given.
        shift: f64,
        /// Why it was rejected.
        why: &'static str,
    },
    /// A denoise strength that is not a finite number.
    #[error(
        "invalid denoise {0}: expected a number (<= 0 gives an empty schedule, >= 1 the full one)"
    )]
    InvalidDenoise(f64),
    /// A step count too large to compute a schedule for.
    #[error("invalid steps {steps}: expected at most {max}")]
    TooManySteps {
        /// The step count given (after denoise scaling).
        steps: u64,
        /// The largest supported step count.
        max: u64,
    },
    /// A schedule the reference computes as NaN: `kl_optimal` for a single step (0/0).
    #[error(
        "scheduler {scheduler} is undefined for a {steps}-step schedule (its first sigma is 0/0); it needs at least 2"
    )]
    UndefinedSchedule {
        /// The scheduler name.
        scheduler: &'static str,
        /// The step count it would be computed for (after denoise scaling).
        steps: u64,
    },
}

//! Properties every schedule has, for any step count and model: the length below, the last value
//! 0, non-increasing values, and a first value no larger than sigma_max (up to a float32 round
//! trip for karras, exponential and kl_optimal); with denoise, at most `steps + 1` values and a
//! lower denoise never starts higher.
//!
//! Exact length invariant (as ComfyUI): `steps + 1` values, except
//! - `beta`: `distinct + 1` where `distinct` counts the runs of equal table indices, so between
//!   2 and `steps + 1` values;
//! - `ddim_uniform`: `ceil((len - 1) / stride) + 1` values with `stride = max(len / steps, 1)`
//!   (a leading 0 is added because no table here has `sigmas[1] ~ 0`);
//! - `normal`: `steps + 1` as well, because no table here has `sigma(sigma_min) ~ 0` (otherwise
//!   it computes one more point and omits the appended 0, which is again `steps + 1` values).

use flux_schedulers::{
    ModelSampling, Scheduler, calculate_sigmas, ksampler_check, ksampler_sigmas,
};
use proptest::prelude::*;
use std::sync::OnceLock;

fn models() -> &'static [ModelSampling; 3] {
    static M: OnceLock<[ModelSampling; 3]> = OnceLock::new();
    M.get_or_init(|| {
        [
            ModelSampling::flux_dev(),
            ModelSampling::flux_schnell(),
            ModelSampling::sd15(),
        ]
    })
}

fn expected_len(s: Scheduler, model: &ModelSampling, steps: usize) -> Option<usize> {
    match s {
        Scheduler::Beta => None,
        Scheduler::DdimUniform => {
            let len = model.table().len();
            let stride = (len / steps).max(1);
            Some((len - 1).div_ceil(stride) + 1)
        }
        _ => Some(steps + 1),
    }
}

fn scheduler() -> impl Strategy<Value = Scheduler> {
    proptest::sample::select(Scheduler::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn schedules_are_well_formed(s in scheduler(), m in 0usize..3, steps in 1usize..120) {
        let model = &models()[m];
        let sigmas = calculate_sigmas(s, model, steps).unwrap();
        match expected_len(s, model, steps) {
            Some(n) => prop_assert_eq!(sigmas.len(), n),
            None => prop_assert!((2..=steps + 1).contains(&sigmas.len())),
        }
        prop_assert_eq!(*sigmas.last().unwrap(), 0.0);
        // kl_optimal with one step is [NaN, 0] in ComfyUI (0/0); everything else is finite.
        if s == Scheduler::KlOptimal && steps == 1 {
            prop_assert!(sigmas[0].is_nan());
            return Ok(());
        }
        // karras, exponential and kl_optimal reach sigma_max through a float32 round trip
        // (x^(1/7))^7, exp(ln x), tan(atan x), which can land a few ulps above it, in ComfyUI too.
        let sigma_max = model.sigma_max() as f32;
        let bound = match s {
            Scheduler::Karras | Scheduler::Exponential | Scheduler::KlOptimal => {
                sigma_max * (1.0 + 8.0 * f32::EPSILON)
            }
            _ => sigma_max,
        };
        prop_assert!(sigmas[0] <= bound, "first {} > sigma_max {}", sigmas[0], sigma_max);
        for w in sigmas.windows(2) {
            prop_assert!(w[1] <= w[0], "not non-increasing: {:?}", sigmas);
        }
    }

    #[test]
    fn lower_denoise_never_starts_higher(
        s in scheduler(),
        m in 0usize..3,
        steps in 1usize..40,
        d1 in 0.01f64..1.0,
        d2 in 0.01f64..1.0,
        discard in any::<bool>(),
    ) {
        let model = &models()[m];
        let (lo, hi) = if d1 <= d2 { (d1, d2) } else { (d2, d1) };
        let a = ksampler_sigmas(s, model, steps, lo, discard).unwrap();
        let b = ksampler_sigmas(s, model, steps, hi, discard).unwrap();
        prop_assert!(a.len() <= steps + 1 && b.len() <= steps + 1);
        prop_assert_eq!(*a.last().unwrap(), 0.0);
        // linear_quadratic is exempt: its linear part spans `total // 2` steps, so the schedule
        // for the larger total that a lower denoise uses can start (slightly) higher, e.g. 3 steps
        // at denoise 0.254 (total 11) against 0.276 (total 10). ComfyUI computes it the same way.
        if s != Scheduler::LinearQuadratic && !a[0].is_nan() && !b[0].is_nan() {
            prop_assert!(a[0] <= b[0], "denoise {} starts at {}, denoise {} at {}", lo, a[0], hi, b[0]);
        }
    }
}

#[test]
fn denoise_edges_follow_ksampler() {
    let model = ModelSampling::flux_dev();
    for s in Scheduler::ALL {
        assert!(
            ksampler_sigmas(s, &model, 10, 0.0, false)
                .unwrap()
                .is_empty()
        );
        assert!(
            ksampler_sigmas(s, &model, 10, -1.0, false)
                .unwrap()
                .is_empty()
        );
        let full = calculate_sigmas(s, &model, 10).unwrap();
        assert_eq!(
            ksampler_sigmas(s, &model, 10, 0.99995, false).unwrap(),
            full
        );
        assert!(ksampler_sigmas(s, &model, 10, f64::NAN, false).is_err());
    }
}

#[test]
fn scheduler_names_round_trip() {
    for s in Scheduler::ALL {
        assert_eq!(s.to_string().parse::<Scheduler>().unwrap(), s);
    }
    let err = "karas".parse::<Scheduler>().unwrap_err().to_string();
    assert!(err.contains("karas") && err.contains("kl_optimal"), "{err}");
}

#[test]
fn flux_shift_line_passes_through_the_reference_points() {
    // The two points of the original Flux sampling code's get_lin_function.
    assert!((flux_schedulers::flux_shift_for_tokens(256) - 0.5).abs() < 1e-12);
    assert!((flux_schedulers::flux_shift_for_tokens(4096) - 1.15).abs() < 1e-12);
    assert!((flux_schedulers::flux_shift_for_size(1024, 1024) - 1.15).abs() < 1e-12);
}

#[test]
fn percent_to_sigma_ends_and_f32_evaluation() {
    let flux = ModelSampling::flux_dev();
    assert_eq!(flux.percent_to_sigma(0.0), 1.0);
    assert_eq!(flux.percent_to_sigma(1.0), 0.0);
    // Evaluated in float32: the result is an f32 value.
    let s = flux.percent_to_sigma(1e-4);
    assert_eq!(f64::from(s as f32), s);
    // (1 - 0.2) in f32 is an exact table point t = 8000/10000, so it lands on a table entry.
    assert_eq!(flux.percent_to_sigma(0.2), f64::from(flux.table()[7999]));
    let sd = ModelSampling::sd15();
    assert_eq!(sd.percent_to_sigma(0.0), 999_999_999.9);
    assert_eq!(sd.percent_to_sigma(1.0), 0.0);
    // exp(ln(sigma)) in f32 need not give the table value back exactly.
    assert!((sd.sigma(999.0) / sd.sigma_max() - 1.0).abs() < 1e-6);
    assert_eq!(sd.timestep(sd.sigma_max()), 999.0);
    assert_eq!(sd.timestep(sd.sigma_min()), 0.0);
}

#[test]
fn models_by_name() {
    assert_eq!(
        ModelSampling::from_name("flux-dev", None).unwrap().shift(),
        Some(1.15)
    );
    assert_eq!(
        ModelSampling::from_name("flux-schnell", None)
            .unwrap()
            .shift(),
        Some(1.0)
    );
    assert_eq!(
        ModelSampling::from_name("flux-dev", Some(3.0))
            .unwrap()
            .shift(),
        Some(3.0)
    );
    assert!(
        ModelSampling::from_name("sd15", None)
            .unwrap()
            .shift()
            .is_none()
    );
    assert!(ModelSampling::from_name("sd15", Some(1.0)).is_err());
    assert!(ModelSampling::from_name("flux-dev", Some(f64::NAN)).is_err());
    let err = ModelSampling::from_name("sdxl", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("flux-schnell"), "{err}");
}

/// `ksampler_check` passes exactly the arguments whose schedule computes and is finite, for
/// every scheduler, the request range of steps (1 to 50) and denoise values from 0 to 1
/// (including the tiny ones whose scaled step count is too large), with and without the
/// penultimate-sigma discard.
#[test]
fn ksampler_check_passes_exactly_the_finite_schedules() {
    let model = &models()[0];
    let denoises = [
        0.0, 1e-9, 1e-6, 0.05, 0.3, 0.5, 0.5001, 0.6, 0.75, 0.9999, 0.99995, 1.0,
    ];
    let (mut passed, mut refused) = (0, 0);
    for s in Scheduler::ALL {
        for steps in 1..=50 {
            for &denoise in &denoises {
                for discard in [false, true] {
                    let check = ksampler_check(s, steps, denoise, discard);
                    let sigmas = ksampler_sigmas(s, model, steps, denoise, discard);
                    let finite = sigmas
                        .as_ref()
                        .is_ok_and(|v| v.iter().all(|x| x.is_finite()));
                    assert_eq!(
                        check.is_ok(),
                        finite,
                        "{s} {steps} steps denoise {denoise} discard {discard}: check {check:?}"
                    );
                    if check.is_ok() {
                        passed += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
        }
    }
    // Both outcomes occur: tiny denoise values and one-step kl_optimal are refused.
    assert!(
        passed > 0 && refused > 0,
        "{passed} passed, {refused} refused"
    );
    // At the largest scaled step count, whichever side of the limit the division lands on,
    // the check and the computation agree.
    for steps in [1, 7, 50] {
        let denoise = steps as f64 / flux_schedulers::MAX_STEPS as f64;
        for discard in [false, true] {
            let check = ksampler_check(Scheduler::Simple, steps, denoise, discard);
            let sigmas = ksampler_sigmas(Scheduler::Simple, model, steps, denoise, discard);
            assert_eq!(
                check.is_ok(),
                sigmas.is_ok(),
                "{steps} steps, discard {discard}"
            );
        }
    }
}

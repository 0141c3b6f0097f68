//! Every combination of parameters the job API accepts runs to an image on the demo model:
//! each sampler with each scheduler, at step counts and denoise values on the edges of the
//! accepted ranges. A request that passes validation must never fail in the schedule or the
//! sampler (the API has already answered "QUEUED" by then).

use flux_pipeline::image_io::{ImageSource, OutputFormat, decode_rgb};
use flux_pipeline::{Img2ImgRequest, Pipeline};
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;

fn input_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 15) as u8, (y * 15) as u8, 80])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("encode the input");
    bytes.into_inner()
}

fn run(
    pipeline: &Pipeline,
    png: &[u8],
    sampler: Sampler,
    scheduler: Scheduler,
    steps: usize,
    denoise: f64,
) -> Result<(), String> {
    let mut req = Img2ImgRequest::new(ImageSource::Bytes(png.to_vec()), "a cat");
    req.sampler = sampler;
    req.scheduler = scheduler;
    req.steps = steps;
    req.denoise = denoise;
    req.format = OutputFormat::Png;
    let what = format!("{sampler} / {scheduler} / {steps} steps / denoise {denoise}");
    req.validate()
        .map_err(|e| format!("{what}: refused by validation: {e}"))?;
    // What validation passes has a finite schedule.
    let params = flux_pipeline::comfy::RunParams {
        sampler,
        scheduler,
        steps,
        denoise,
        seed: 0,
        guidance: 3.5,
        dtype: flux_kernels::DType::F32,
    };
    let sigmas =
        flux_pipeline::comfy::schedule(&params, true).map_err(|e| format!("{what}: {e}"))?;
    if sigmas.iter().any(|s| !s.is_finite()) {
        return Err(format!("{what}: validated, but the schedule is {sigmas:?}"));
    }
    let out = pipeline
        .img2img(&req, &mut |_| true)
        .map_err(|e| format!("{what}: {e}"))?;
    let rgb = decode_rgb(&out.bytes, "output").map_err(|e| format!("{what}: {e}"))?;
    if rgb.dimensions() != (16, 16) {
        return Err(format!("{what}: output is {:?}", rgb.dimensions()));
    }
    Ok(())
}

#[test]
fn every_sampler_and_scheduler_run_at_the_edges_of_the_accepted_ranges() {
    let pipeline = Pipeline::demo().expect("the demo model");
    let png = input_png();
    let mut failures = Vec::new();
    let mut runs = 0;
    let mut refused = 0;
    for &sampler in Sampler::ALL {
        for scheduler in Scheduler::ALL {
            for (steps, denoise) in [(1, 1.0), (1, 0.6), (2, 0.05), (3, 0.5)] {
                runs += 1;
                match run(&pipeline, &png, sampler, scheduler, steps, denoise) {
                    Ok(()) => {}
                    // kl_optimal is undefined over a one-step schedule (0/0 in the
                    // reference); validation says so. Nothing else may be refused.
                    Err(e)
                        if scheduler == Scheduler::KlOptimal
                            && steps == 1
                            && !sampler.discards_penultimate_sigma()
                            && e.contains("refused by validation") =>
                    {
                        refused += 1;
                    }
                    Err(e) => failures.push(e),
                }
            }
        }
    }
    assert!(runs >= 44 * 9 * 4);
    assert_eq!(
        refused,
        40 * 2,
        "one-step kl_optimal with the 40 samplers that keep it"
    );
    assert!(
        failures.is_empty(),
        "{} of {runs} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_smallest_denoise_values_run_or_are_refused_by_validation() {
    let pipeline = Pipeline::demo().expect("the demo model");
    let png = input_png();
    let mut failures = Vec::new();
    for scheduler in Scheduler::ALL {
        for (steps, denoise) in [(50, 1e-5), (1, 1e-7), (50, f64::MIN_POSITIVE), (50, 0.0)] {
            match run(&pipeline, &png, Sampler::Euler, scheduler, steps, denoise) {
                Ok(()) => {}
                Err(e) if e.contains("refused by validation") && e.contains("denoise") => {}
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

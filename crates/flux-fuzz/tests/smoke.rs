//! The fuzz targets' bodies on stable: every seed input, then mutations of them drawn from a
//! fixed seed (so a failure reproduces), and for the job API also bodies built field by field.
//! `FLUX_FUZZ_ITERS=N` runs N mutations per target instead of the default; `FLUX_FUZZ_SEED=S`
//! draws a different sequence. An input that makes a body panic is written to the temporary
//! folder and named in the failure.

use flux_fuzz::corpus::{self, random_request};
use flux_fuzz::{Mutator, Target};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

/// Runs `body` on `input`; a panic becomes an error naming a file that holds the input.
fn survive(what: &str, input: &[u8], body: impl Fn(&[u8])) -> Result<(), String> {
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_ok() {
        return Ok(());
    }
    let path = std::env::temp_dir().join(format!("flux-fuzz-{what}-{}.bin", std::process::id()));
    let saved = std::fs::write(&path, input).map_or_else(
        |e| format!("(could not save it: {e})"),
        |()| format!("saved to {}", path.display()),
    );
    let head = input.iter().take(256).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    Err(format!(
        "{what}: panicked on a {}-byte input, {saved}; first bytes {head}",
        input.len()
    ))
}

fn smoke(target: Target, default_iters: u64) {
    let seeds = corpus::seeds(target, Some(&testdata()));
    let iters = env_number("FLUX_FUZZ_ITERS", default_iters);
    let seed = env_number("FLUX_FUZZ_SEED", 0x5eed) ^ target as u64;
    let mut m = Mutator::new(seed);
    let mut failures = Vec::new();
    for input in &seeds {
        failures.extend(survive(target.name(), input, |d| target.run(d)).err());
    }
    for _ in 0..iters {
        let base = m.pick(&seeds).clone();
        let input = target.mutate(&mut m, &base, &seeds);
        failures.extend(survive(target.name(), &input, |d| target.run(d)).err());
        if failures.len() >= 5 {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(flux_fuzz::scratch_dir());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn api_request_survives_mutated_bodies() {
    smoke(Target::ApiRequest, 20_000);
}

#[test]
fn api_request_survives_bodies_built_field_by_field() {
    let iters = env_number("FLUX_FUZZ_ITERS", 20_000);
    let mut m = Mutator::new(env_number("FLUX_FUZZ_SEED", 0x5eed));
    let (mut accepted, mut failures) = (0, Vec::new());
    for i in 0..iters {
        let body = random_request(&mut m);
        // Every fourth body also gets byte edits on top of its structure.
        let body = if i % 4 == 3 {
            m.mutate(&body, &[])
        } else {
            body
        };
        accepted += usize::from(flux_api::parse_request(&body).is_ok());
        failures.extend(survive("api_request", &body, flux_fuzz::api_request).err());
        if failures.len() >= 5 {
            break;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The generator must reach the success path too, or it only tests the first check.
    assert!(accepted > 0, "no generated body was accepted in {iters}");
}

#[test]
fn image_decode_survives_mutated_images() {
    smoke(Target::ImageDecode, 20_000);
}

#[test]
fn safetensors_header_survives_mutated_checkpoints() {
    smoke(Target::SafetensorsHeader, 20_000);
}

#[test]
fn tokenizer_survives_mutated_prompts_and_files() {
    smoke(Target::Tokenizer, 20_000);
}

/// The seeds reach the success paths: valid requests are accepted, every seed image decodes,
/// every seed checkpoint parses (the tiny transformer loads), the seed tokenizer loads.
#[test]
fn the_seeds_are_valid_inputs_where_meant_to_be() {
    for target in Target::ALL {
        let n = corpus::seeds(target, Some(&testdata())).len();
        assert!(n >= 4, "{}: only {n} seeds", target.name());
    }
    let accepted = corpus::request_seeds()
        .iter()
        .filter(|b| flux_api::parse_request(b).is_ok())
        .count();
    assert_eq!(accepted, 3, "the three valid request seeds");
    for (i, img) in corpus::seeds(Target::ImageDecode, Some(&testdata()))
        .iter()
        .enumerate()
    {
        if let Err(e) = flux_pipeline::image_io::decode_rgb(img, "seed") {
            panic!("seed image {i}: {e}");
        }
    }
    let checkpoints = corpus::seeds(Target::SafetensorsHeader, Some(&testdata()));
    assert_eq!(
        checkpoints.len(),
        4,
        "three made here and the tiny transformer"
    );
    for (i, c) in checkpoints.iter().enumerate() {
        if let Err(e) = flux_model::weights::Weights::from_bytes(c.clone(), "seed") {
            panic!("seed checkpoint {i}: {e}");
        }
    }
    let tiny = flux_model::weights::Weights::from_bytes(checkpoints[3].clone(), "tiny")
        .expect("the tiny transformer parses");
    let axes = flux_fuzz::tiny_transformer_config();
    let cfg = flux_model::transformer::FluxConfig::detect(&tiny, Some(&axes))
        .expect("the tiny transformer's configuration");
    flux_model::transformer::FluxTransformer::load_with_config(
        &flux_kernels::Cpu,
        &tiny,
        cfg,
        flux_kernels::DType::F32,
    )
    .expect("the tiny transformer loads");
    assert_eq!(
        corpus::t5_tokenizer()
            .encode("a cab")
            .expect("encode")
            .len(),
        corpus::T5_SEED_LEN
    );
}

/// The harness reports a body that panics, with the input saved.
#[test]
fn a_panicking_body_is_reported_with_its_input() {
    let err = survive("harness-check", b"\x01\x02", |d| {
        assert!(d.len() < 2, "too long");
    })
    .expect_err("the panic is caught and reported");
    assert!(
        err.contains("2-byte input") && err.contains("0102"),
        "{err}"
    );
    let path = std::env::temp_dir().join(format!(
        "flux-fuzz-harness-check-{}.bin",
        std::process::id()
    ));
    assert_eq!(
        std::fs::read(&path).expect("the input was saved"),
        b"\x01\x02"
    );
    let _ = std::fs::remove_file(path);
    assert!(survive("harness-check", b"\x01", |d| assert!(d.len() < 2)).is_ok());
}

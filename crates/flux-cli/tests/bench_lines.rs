//! `flux bench ...` prints exactly one `key=value` line that other tools parse: the keys in
//! their documented order, the echoed arguments as given, every measured figure a positive
//! finite number. Bad arguments fail cleanly, naming the argument. Tiny sizes: this checks the
//! interface, not the speed.

mod common;

use common::{failed, flux, ok};

/// The one line of a successful run, split into `(key, value)` pairs.
fn line_of(args: &[&str]) -> Vec<(String, String)> {
    let o = flux(&args.iter().map(ToString::to_string).collect::<Vec<_>>());
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got {out:?}");
    lines[0]
        .split(' ')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("'{kv}' is not key=value in {out:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn keys(pairs: &[(String, String)]) -> Vec<&str> {
    pairs.iter().map(|(k, _)| k.as_str()).collect()
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find_map(|(k, v)| (k == key).then_some(v.as_str()))
        .unwrap_or_else(|| panic!("no key {key} in {pairs:?}"))
}

fn positive(pairs: &[(String, String)], key: &str) -> f64 {
    let v: f64 = value(pairs, key)
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not a number: {e}"));
    assert!(v.is_finite() && v > 0.0, "{key}={v}");
    v
}

#[test]
fn sampler_bench_prints_its_one_line() {
    for sampler in ["euler", "dpmpp_2m_sde"] {
        let pairs = line_of(&[
            "bench",
            "sampler",
            "--sampler",
            sampler,
            "--steps",
            "3",
            "--shape",
            "1,4,8,8",
            "--threads",
            "1",
        ]);
        assert_eq!(
            keys(&pairs),
            [
                "sampler",
                "shape",
                "steps",
                "total_s",
                "overhead_per_step_s"
            ]
        );
        assert_eq!(value(&pairs, "sampler"), sampler);
        assert_eq!(value(&pairs, "shape"), "1,4,8,8");
        assert_eq!(value(&pairs, "steps"), "3");
        let total = positive(&pairs, "total_s");
        let overhead = positive(&pairs, "overhead_per_step_s");
        // The overhead excludes the denoiser, so the three steps' overhead is part of the total.
        assert!(
            3.0 * overhead <= total,
            "overhead {overhead} x 3 > total {total}"
        );
    }
}

#[test]
fn copy_bench_prints_its_one_line() {
    let pairs = line_of(&[
        "bench", "copy", "--shape", "2,3,5,7", "--dtype", "f64", "--reps", "3",
    ]);
    assert_eq!(
        keys(&pairs),
        [
            "bench",
            "shape",
            "dtype",
            "bytes",
            "copy_s",
            "three_copies_s"
        ]
    );
    assert_eq!(value(&pairs, "bench"), "copy");
    assert_eq!(value(&pairs, "shape"), "2,3,5,7");
    assert_eq!(value(&pairs, "dtype"), "f64");
    assert_eq!(value(&pairs, "bytes"), (2 * 3 * 5 * 7 * 8).to_string());
    let one = positive(&pairs, "copy_s");
    let three = positive(&pairs, "three_copies_s");
    assert!((three / one - 3.0).abs() < 1e-5, "{one} {three}");
}

#[test]
fn bad_bench_arguments_fail_naming_them() {
    let cases: [(&[&str], &str); 6] = [
        (&["bench", "sampler", "--sampler", "eulr"], "dpmpp_2m"),
        (
            &["bench", "sampler", "--sampler", "euler", "--shape", "1,x"],
            "--shape",
        ),
        (
            &["bench", "sampler", "--sampler", "euler", "--steps", "0"],
            "--steps",
        ),
        (
            &["bench", "sampler", "--sampler", "euler", "--dtype", "bf16"],
            "--dtype",
        ),
        (&["bench", "copy", "--shape", "4,0"], "--shape"),
        (&["bench", "copy", "--reps", "0"], "--reps"),
    ];
    for (args, named) in cases {
        let err = failed(&flux(
            &args.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ));
        assert!(err.contains(named), "{args:?}: {err}");
    }
}

//! `flux img2img` end to end as a subprocess, on the built-in demo model.

use std::path::{Path, PathBuf};
use std::process::Command;

fn demo_image() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images/demo.png")
}

fn run(args: &[&str], out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .arg("img2img")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("flux runs")
}

fn decode(path: &Path) -> image::RgbImage {
    image::open(path).expect("output decodes").to_rgb8()
}

#[test]
fn demo_runs_are_deterministic_and_change_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = demo_image();
    let img = img.to_str().unwrap();
    let base = ["--image", img, "--prompt", "a red circle", "--steps", "3"];
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    let c = dir.path().join("c.png");
    for (out, seed) in [(&a, "1"), (&b, "1"), (&c, "2")] {
        let o = run(&[&base[..], &["--seed", seed]].concat(), out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let input = decode(&demo_image());
    let out = decode(&a);
    assert_eq!(out.dimensions(), input.dimensions());
    assert_ne!(out, input, "denoise 0.75 must change the image");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    let png = std::fs::read(&a).unwrap();
    assert!(
        png.windows(4).any(|w| w == b"demo"),
        "demo label in the metadata"
    );
}

#[test]
fn denoise_zero_returns_the_input_and_formats_follow_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let img = demo_image();
    let img = img.to_str().unwrap();
    let out = dir.path().join("same.webp");
    let o = run(&["--image", img, "--prompt", "x", "--denoise", "0"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[8..12], b"WEBP");
    assert_eq!(decode(&out), decode(&demo_image()));
    let jpg = dir.path().join("x.jpg");
    let o = run(&["--image", img, "--prompt", "x", "--steps", "2"], &jpg);
    assert!(o.status.success());
    assert_eq!(&std::fs::read(&jpg).unwrap()[..2], &[0xFF, 0xD8]);
}

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let img = demo_image();
    let img = img.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", "missing.png", "--prompt", "x"],
            "missing.png",
        ),
        (
            vec!["--image", corrupt.to_str().unwrap(), "--prompt", "x"],
            "corrupt.png",
        ),
        (
            vec!["--image", img, "--prompt", "x", "--sampler", "nope"],
            "unknown sampler",
        ),
        (
            vec!["--image", img, "--prompt", "x", "--scheduler", "nope"],
            "nope",
        ),
        (
            vec!["--image", img, "--prompt", "x", "--steps", "0"],
            "steps",
        ),
        (
            vec!["--image", img, "--prompt", "x", "--steps", "100000"],
            "steps",
        ),
        (
            vec!["--image", img, "--prompt", "x", "--denoise", "1.5"],
            "denoise",
        ),
    ];
    for (args, needle) in cases {
        let out = dir.path().join("out.png");
        let o = run(&args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left an output file");
    }
    // An --out in a folder that does not exist, or naming a folder: refused up front, with
    // the folder named, and nothing created.
    let missing = dir.path().join("no-such-folder").join("out.png");
    let o = run(&["--image", img, "--prompt", "x"], &missing);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "an --out in a missing folder succeeded"
    );
    assert!(
        err.contains("--out") && err.contains("no-such-folder") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!dir.path().join("no-such-folder").exists());
    let o = run(&["--image", img, "--prompt", "x"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an --out naming a folder succeeded");
    assert!(
        err.contains("--out") && err.contains("is a folder"),
        "{err}"
    );
}

//! `flux parity DIR` over a folder mixing good reference data with broken manifests: every
//! broken folder is one failed result naming its manifest and what is wrong, the good cases
//! still run, and the last line is the `parity: N passed, M failed` summary other tools read,
//! with a failing exit code.

mod common;

use common::flux;
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the reference folder") {
        let entry = entry.expect("a folder entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a reference file");
    }
}

#[test]
fn broken_manifests_are_failures_and_the_summary_line_still_comes_last() {
    let root = tempfile::tempdir().expect("scratch folder");
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    copy_dir(&testdata.join("rng"), &root.path().join("rng"));
    let broken = [
        ("not-json", "this is not JSON"),
        ("no-kind", r#"{"note": "neither kind nor cases"}"#),
        ("bad-cases", r#"{"cases": [{"name": 3}]}"#),
    ];
    for (name, text) in broken {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).expect("create a broken folder");
        std::fs::write(dir.join("manifest.json"), text).expect("write a broken manifest");
    }
    let o = flux(&["parity".into(), root.path().display().to_string()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = out.lines().last().unwrap_or_default();
    let Some(counts) = last
        .strip_prefix("parity: ")
        .and_then(|r| r.strip_suffix(" failed"))
    else {
        panic!("last line is not the summary: {last:?}");
    };
    let counts: Vec<usize> = counts
        .split(" passed, ")
        .map(|n| n.parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), 2, "{last}");
    assert!(counts[0] > 0, "the good rng cases ran: {last}");
    assert_eq!(counts[1], 3, "one failure per broken folder: {last}");
    for (name, _) in broken {
        assert!(
            out.lines().any(|l| l.contains(name) && l.contains("FAIL")),
            "{name} is not reported as failed:\n{out}"
        );
    }
    assert!(out.contains("invalid JSON"), "{out}");
}

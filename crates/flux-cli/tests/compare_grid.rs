//! `flux compare --image ... --samplers ... --schedulers ...` on the demo model: the grid's size
//! follows the documented layout, every cell is the image `flux img2img` makes with the same
//! parameters, every label is drawn; a bad sampler name fails with the valid names, an output
//! folder that does not exist is refused; the two-image mode still works.

mod common;

use common::{decode, demo_image, failed, flux, ok};
use std::path::Path;

/// The layout `flux compare --help` documents: 4-pixel border and gaps, a 12-pixel label strip
/// above each image with 8x8 glyphs 2 pixels in, cells as wide as the widest of image and label.
const GAP: u32 = 4;
const LABEL_H: u32 = 12;

fn base_args(out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["--image".to_string(), demo_image().display().to_string()].into();
    for s in ["--prompt", "a red cab", "--steps", "2", "--seed", "11"] {
        a.push(s.into());
    }
    a.push("--out".into());
    a.push(out.display().to_string());
    a
}

/// Whether the glyph of `c` has ink at (`x`, `y`).
fn ink(c: char, x: u32, y: u32) -> bool {
    use font8x8::UnicodeFonts as _;
    let g = font8x8::BASIC_FONTS.get(c).expect("basic Latin glyph");
    g[y as usize] >> x & 1 == 1
}

#[test]
fn a_grid_of_two_samplers_by_two_schedulers() {
    let dir = tempfile::tempdir().unwrap();
    let grid_path = dir.path().join("grid.png");
    let samplers = ["euler", "heun"];
    let schedulers = ["simple", "karras"];
    let mut args = vec!["compare".to_string()];
    args.extend(base_args(&grid_path));
    args.extend([
        "--samplers".into(),
        samplers.join(","),
        "--schedulers".into(),
        schedulers.join(","),
    ]);
    ok(&flux(&args));
    let grid = decode(&grid_path);

    let (w, h) = decode(&demo_image()).dimensions();
    let labels: Vec<Vec<String>> = schedulers
        .iter()
        .map(|sch| samplers.iter().map(|s| format!("{s} / {sch}")).collect())
        .collect();
    let longest = labels.iter().flatten().map(String::len).max().unwrap() as u32;
    let cell_w = w.max(8 * longest + 4);
    assert_eq!(
        grid.dimensions(),
        (GAP + 2 * (cell_w + GAP), GAP + 2 * (LABEL_H + h + GAP))
    );

    for (r, sch) in schedulers.iter().enumerate() {
        for (c, s) in samplers.iter().enumerate() {
            let x0 = GAP + c as u32 * (cell_w + GAP);
            let y0 = GAP + r as u32 * (LABEL_H + h + GAP);

            // The image: exactly what `flux img2img` writes for the same parameters.
            let single = dir.path().join(format!("{s}-{sch}.png"));
            let mut a = vec!["img2img".to_string()];
            a.extend(base_args(&single));
            a.extend([
                "--sampler".into(),
                (*s).into(),
                "--scheduler".into(),
                (*sch).into(),
            ]);
            ok(&flux(&a));
            let want = decode(&single);
            let cell = image::imageops::crop_imm(&grid, x0, y0 + LABEL_H, w, h).to_image();
            assert!(
                cell == want,
                "cell {s} / {sch} differs from its img2img run"
            );

            // The label: the font's glyphs in black on white, nothing else in the strip.
            let label = &labels[r][c];
            let mut inked = 0;
            for y in 0..LABEL_H {
                for x in 0..cell_w {
                    let (tx, ty) = (x.wrapping_sub(2), y.wrapping_sub(2));
                    let ch = label.chars().nth((tx / 8) as usize);
                    let want_ink = ty < 8 && ch.is_some_and(|ch| ink(ch, tx % 8, ty));
                    let px = grid.get_pixel(x0 + x, y0 + y).0;
                    let expect = if want_ink { [0, 0, 0] } else { [255, 255, 255] };
                    assert_eq!(px, expect, "label {label}: pixel ({x}, {y})");
                    inked += usize::from(want_ink);
                }
            }
            assert!(inked > 8 * label.len(), "label {label} has too little ink");
        }
    }
    // The cells differ from each other (the samplers and schedulers do something).
    let a = image::imageops::crop_imm(&grid, GAP, GAP + LABEL_H, w, h).to_image();
    let b = image::imageops::crop_imm(&grid, GAP + cell_w + GAP, GAP + LABEL_H, w, h).to_image();
    assert!(a != b, "euler and heun gave the same image");
}

#[test]
fn an_unknown_sampler_in_the_list_names_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let mut args = vec!["compare".to_string()];
    args.extend(base_args(&out));
    args.extend(["--samplers".into(), "euler,eulr".into()]);
    let err = failed(&flux(&args));
    for n in ["eulr", "--samplers", "euler_ancestral", "dpmpp_2m"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!out.exists());

    let mut args = vec!["compare".to_string()];
    args.extend(base_args(&out));
    args.extend(["--schedulers".into(), "simple,fast".into()]);
    let err = failed(&flux(&args));
    for n in ["fast", "--schedulers", "karras", "beta"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!out.exists());

    // A grid whose --out folder does not exist is refused before any cell is computed.
    let missing = dir.path().join("no-such-folder").join("grid.png");
    let mut args = vec!["compare".to_string()];
    args.extend(base_args(&missing));
    args.extend(["--samplers".into(), "euler".into()]);
    let err = failed(&flux(&args));
    for n in ["--out", "no-such-folder", "does not exist"] {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn two_images_are_still_compared() {
    let img = demo_image().display().to_string();
    let o = flux(&["compare".into(), img.clone(), img]);
    ok(&o);
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(
        line.contains("width=96 height=64") && line.contains("pass=true"),
        "{line}"
    );
    // One image alone is neither mode.
    let err = failed(&flux(&[
        "compare".into(),
        demo_image().display().to_string(),
    ]));
    assert!(err.contains("required"), "{err}");
}

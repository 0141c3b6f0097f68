//! `flux compare A B`: how close two images are, as one `key=value` line (PSNR in dB over the
//! RGB channels, largest and mean absolute difference in 8-bit levels), with the exit code saying
//! whether they are within the thresholds (0: yes, 1: no; errors: 2).

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `flux compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// First image (PNG, JPEG or WebP).
    pub a: PathBuf,
    /// Second image, of the same size.
    pub b: PathBuf,
    /// Fail when the PSNR is below this many dB.
    #[arg(long, default_value_t = 30.0)]
    pub min_psnr: f64,
    /// Fail when any channel differs by more than this many 8-bit levels (no limit by default).
    #[arg(long)]
    pub max_abs: Option<u8>,
}

/// How two images differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Diff {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Peak signal-to-noise ratio in dB (infinite for identical images).
    pub psnr_db: f64,
    /// Largest absolute difference of one channel, in 8-bit levels.
    pub max_abs: u8,
    /// Mean absolute difference per channel, in 8-bit levels.
    pub mean_abs: f64,
}

fn load(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("{} is not a PNG, JPEG or WebP image", path.display()))?;
    Ok(img.to_rgb8())
}

/// Compares two RGB images of the same size.
pub fn diff(a: &image::RgbImage, b: &image::RgbImage) -> Result<Diff> {
    if a.dimensions() != b.dimensions() {
        bail!(
            "the images differ in size: {}x{} vs {}x{}",
            a.width(),
            a.height(),
            b.width(),
            b.height()
        );
    }
    let (mut sq, mut abs, mut max) = (0.0f64, 0.0f64, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        abs += f64::from(d);
        sq += f64::from(d) * f64::from(d);
    }
    let n = a.as_raw().len().max(1) as f64;
    let mse = sq / n;
    let psnr_db = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    Ok(Diff {
        width: a.width(),
        height: a.height(),
        psnr_db,
        max_abs: max,
        mean_abs: abs / n,
    })
}

/// Runs `flux compare`.
pub fn run(args: &CompareArgs) -> Result<ExitCode> {
    let d = diff(&load(&args.a)?, &load(&args.b)?)?;
    let pass = d.psnr_db >= args.min_psnr && args.max_abs.is_none_or(|m| d.max_abs <= m);
    println!(
        "width={} height={} psnr_db={:.3} max_abs_diff={} mean_abs_diff={:.4} pass={pass}",
        d.width, d.height, d.psnr_db, d.max_abs, d.mean_abs
    );
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::diff;

    #[test]
    fn identical_images_have_infinite_psnr() {
        let a = image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let d = diff(&a, &a).unwrap();
        assert!(d.psnr_db.is_infinite());
        assert_eq!(d.max_abs, 0);
    }

    #[test]
    fn one_level_in_two_of_three_channels() {
        let a = image::RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let b = image::RgbImage::from_pixel(4, 4, image::Rgb([101, 99, 100]));
        let d = diff(&a, &b).unwrap();
        // MSE = 2/3: 10 log10(255^2 * 3 / 2) = 49.892 dB.
        assert!((d.psnr_db - 49.892).abs() < 1e-3, "{}", d.psnr_db);
        assert_eq!(d.max_abs, 1);
        assert!((d.mean_abs - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn different_sizes_are_an_error() {
        let a = image::RgbImage::new(2, 2);
        let b = image::RgbImage::new(2, 3);
        assert!(diff(&a, &b).unwrap_err().to_string().contains("2x2 vs 2x3"));
    }
}

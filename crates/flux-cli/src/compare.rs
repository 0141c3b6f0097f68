//! `flux compare`, two modes:
//!
//! * `flux compare A B`: how close two images are, as one `key=value` line (PSNR in dB over the
//!   RGB channels, largest and mean absolute difference in 8-bit levels), with the exit code
//!   saying whether they are within the thresholds (0: yes, 1: no; errors: 2).
//! * `flux compare --image IN --prompt P --samplers a,b --schedulers x,y`: one img2img run per
//!   (scheduler, sampler) pair with the same seed and parameters, laid out as a labelled grid
//!   image for comparing samplers: one row per scheduler, one column per sampler. Layout: a
//!   border and gaps of [`GAP`] white pixels; every cell is a white label strip [`LABEL_H`]
//!   pixels high holding "sampler / scheduler" in black 8x8 glyphs (at 2 pixels from the
//!   cell's top left corner), then the result image at the cell's left edge. All cells are as
//!   wide as the widest of the image and the longest label (8 pixels a character plus 4).

use crate::backend::{Job, run_on};
use crate::img2img::{ModelArgs, check_out, load_pipeline_on, write_atomic};
use anyhow::{Context, Result, bail};
use clap::Args;
use flux_kernels::Backend;
use flux_pipeline::Img2ImgRequest;
use flux_pipeline::image_io::{ImageSource, OutputFormat};
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// White pixels around the grid and between cells.
pub const GAP: u32 = 4;
/// Height of the label strip above every image.
pub const LABEL_H: u32 = 12;
/// Glyph size of the label font.
const GLYPH: u32 = 8;
/// Distance of the label text from the cell's top left corner.
const LABEL_PAD: u32 = 2;

/// Arguments of `flux compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// First image (PNG, JPEG or WebP); compare mode.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub a: Option<PathBuf>,
    /// Second image, of the same size; compare mode.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub b: Option<PathBuf>,
    /// Fail when the PSNR is below this many dB.
    #[arg(long, default_value_t = 30.0)]
    pub min_psnr: f64,
    /// Fail when any channel differs by more than this many 8-bit levels (no limit by default).
    #[arg(long)]
    pub max_abs: Option<u8>,
    #[command(flatten)]
    pub grid: GridArgs,
}

/// Arguments of the grid mode (`--image`).
#[derive(Args, Debug)]
pub struct GridArgs {
    /// Input image of the grid mode: a file, an http(s) URL, a data: URI or raw base64.
    #[arg(long)]
    pub image: Option<String>,
    /// The prompt (grid mode).
    #[arg(long, requires = "image")]
    pub prompt: Option<String>,
    /// Samplers, comma-separated: the columns (see `flux samplers`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "euler",
        requires = "image"
    )]
    pub samplers: Vec<String>,
    /// Schedulers, comma-separated: the rows (see `flux schedulers`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "simple",
        requires = "image"
    )]
    pub schedulers: Vec<String>,
    /// Model calls per image (1 to 200).
    #[arg(long, default_value_t = 20, requires = "image")]
    pub steps: usize,
    /// Noise seed, the same for every cell.
    #[arg(long, default_value_t = 46588, requires = "image")]
    pub seed: u64,
    /// How much to change the image, 0 to 1.
    #[arg(long, default_value_t = 0.75, requires = "image")]
    pub denoise: f64,
    /// Guidance of flux-dev models (default 3.5).
    #[arg(long, requires = "image")]
    pub guidance: Option<f64>,
    /// Fit the input into WIDTHxHEIGHT (or NxN), keeping the aspect ratio.
    #[arg(long, requires = "image")]
    pub size: Option<String>,
    /// Largest image size in megapixels.
    #[arg(long, requires = "image")]
    pub max_megapixels: Option<f64>,
    /// Output grid image (format from the extension, else PNG).
    #[arg(long, default_value = "grid.png", requires = "image")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
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
    if args.grid.image.is_some() {
        return run_grid(&args.grid).map(|()| ExitCode::SUCCESS);
    }
    let (Some(a), Some(b)) = (&args.a, &args.b) else {
        bail!("two images to compare, or --image for a sampler grid\nhint: flux compare --help");
    };
    let d = diff(&load(a)?, &load(b)?)?;
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

/// The names of a comma-separated list, parsed; `flag` names the list in errors.
fn parse_list<T: std::str::FromStr>(names: &[String], flag: &str, lister: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let names: Vec<&str> = names
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        bail!("--{flag} is empty\nhint: `flux {lister}` lists the names");
    }
    names
        .iter()
        .map(|n| {
            n.parse::<T>()
                .map_err(|e| anyhow::anyhow!("--{flag}: {e}\nhint: `flux {lister}` describes them"))
        })
        .collect()
}

/// One row per scheduler, one column per sampler.
struct Grid {
    samplers: Vec<Sampler>,
    schedulers: Vec<Scheduler>,
}

fn run_grid(args: &GridArgs) -> Result<()> {
    let Some(image) = &args.image else {
        bail!("--image is required for a grid");
    };
    let Some(prompt) = &args.prompt else {
        bail!("--prompt is required with --image");
    };
    let grid = Grid {
        samplers: parse_list(&args.samplers, "samplers", "samplers")?,
        schedulers: parse_list(&args.schedulers, "schedulers", "schedulers")?,
    };
    let mut req = Img2ImgRequest::new(ImageSource::parse(image), prompt.clone());
    req.steps = args.steps;
    req.seed = args.seed;
    req.denoise = args.denoise;
    req.guidance = args.guidance;
    if let Some(s) = &args.size {
        req.size = s.parse()?;
    }
    req.size.max_megapixels = args.max_megapixels;
    // Lossless cells: each is exactly the image `flux img2img` writes as PNG.
    req.format = OutputFormat::Png;
    req.validate()?;
    check_out(&args.out)?;
    let format = OutputFormat::from_extension(&args.out).unwrap_or_default();
    run_on(
        args.model.backend,
        GridJob {
            args,
            grid: &grid,
            req: &req,
            format,
        },
    )
}

struct GridJob<'a> {
    args: &'a GridArgs,
    grid: &'a Grid,
    req: &'a Img2ImgRequest,
    format: OutputFormat,
}

impl Job for GridJob<'_> {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let start = Instant::now();
        let pipeline = load_pipeline_on(be, &self.args.model)?;
        let total = self.grid.samplers.len() * self.grid.schedulers.len();
        let mut cells = Vec::with_capacity(total);
        for &scheduler in &self.grid.schedulers {
            for &sampler in &self.grid.samplers {
                let label = format!("{} / {}", sampler.name(), scheduler.name());
                eprintln!("cell {} of {total}: {label}", cells.len() + 1);
                let mut req = self.req.clone();
                req.sampler = sampler;
                req.scheduler = scheduler;
                let out = pipeline
                    .img2img(&req, &mut |_| true)
                    .with_context(|| format!("cell {label}"))?;
                let rgb = flux_pipeline::image_io::decode_rgb(&out.bytes, &label)?;
                cells.push((label, rgb));
            }
        }
        let cols = self.grid.samplers.len();
        let canvas = compose(&cells, cols)?;
        let mut metadata = vec![
            ("Software".to_string(), "flux-kernels".to_string()),
            (
                "Description".to_string(),
                format!(
                    "flux compare grid: rows = schedulers, columns = samplers; steps {}, seed {}, denoise {}",
                    self.req.steps, self.req.seed, self.req.denoise
                ),
            ),
        ];
        if pipeline.is_demo() {
            metadata.push((
                "Comment".to_string(),
                flux_pipeline::demo::DEMO_LABEL.to_string(),
            ));
        }
        let bytes = flux_pipeline::image_io::encode_image(&canvas, self.format, &metadata)?;
        write_atomic(&self.args.out, &bytes)?;
        if pipeline.is_demo() {
            eprintln!(
                "note: {} is {}",
                self.args.out.display(),
                flux_pipeline::demo::DEMO_LABEL
            );
        }
        println!(
            "wrote {} ({}x{} {}) in {:.2}s: {} schedulers x {} samplers",
            self.args.out.display(),
            canvas.width(),
            canvas.height(),
            self.format,
            start.elapsed().as_secs_f64(),
            self.grid.schedulers.len(),
            cols
        );
        Ok(())
    }
}

/// Where the cells of a grid go (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Width of every cell.
    pub cell_w: u32,
    /// Height of every image.
    pub image_h: u32,
    /// Grid width.
    pub width: u32,
    /// Grid height.
    pub height: u32,
}

impl Layout {
    /// The layout of `rows x cols` cells of `w x h` images whose longest label has
    /// `label_chars` characters.
    pub fn new(rows: u32, cols: u32, w: u32, h: u32, label_chars: u32) -> Self {
        let cell_w = w.max(label_chars * GLYPH + 2 * LABEL_PAD);
        Self {
            cell_w,
            image_h: h,
            width: GAP + cols * (cell_w + GAP),
            height: GAP + rows * (LABEL_H + h + GAP),
        }
    }

    /// Top left corner of cell (`row`, `col`): its label strip; the image is `LABEL_H` below.
    pub fn cell(&self, row: u32, col: u32) -> (u32, u32) {
        (
            GAP + col * (self.cell_w + GAP),
            GAP + row * (LABEL_H + self.image_h + GAP),
        )
    }
}

/// Lays out labelled cells (row-major, `cols` a row) on a white canvas.
fn compose(cells: &[(String, image::RgbImage)], cols: usize) -> Result<image::RgbImage> {
    let Some((_, first)) = cells.first() else {
        bail!("no cells to lay out");
    };
    let (w, h) = first.dimensions();
    if let Some((label, c)) = cells.iter().find(|(_, c)| c.dimensions() != (w, h)) {
        bail!(
            "cell {label} is {}x{}, the others {w}x{h}",
            c.width(),
            c.height()
        );
    }
    let chars = cells
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let to_u32 = |v: usize| u32::try_from(v).context("grid too large");
    let rows = cells.len().div_ceil(cols.max(1));
    let layout = Layout::new(to_u32(rows)?, to_u32(cols)?, w, h, to_u32(chars)?);
    let mut canvas =
        image::RgbImage::from_pixel(layout.width, layout.height, image::Rgb([255, 255, 255]));
    for (i, (label, img)) in cells.iter().enumerate() {
        let (x, y) = layout.cell(to_u32(i / cols)?, to_u32(i % cols)?);
        draw_text(&mut canvas, x + LABEL_PAD, y + LABEL_PAD, label);
        image::imageops::replace(&mut canvas, img, i64::from(x), i64::from(y + LABEL_H));
    }
    Ok(canvas)
}

/// Draws `text` in black 8x8 glyphs with its top left corner at (`x`, `y`), clipped to the
/// canvas; characters outside the font's basic Latin set are drawn as `?`.
pub fn draw_text(canvas: &mut image::RgbImage, x: u32, y: u32, text: &str) {
    use font8x8::UnicodeFonts as _;
    for (i, ch) in (0u32..).zip(text.chars()) {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (gy, row) in (0u32..).zip(glyph) {
            for gx in 0..GLYPH {
                // Bit 0 is the leftmost pixel of a row.
                if row >> gx & 1 == 1 {
                    let (px, py) = (x + i * GLYPH + gx, y + gy);
                    if px < canvas.width() && py < canvas.height() {
                        canvas.put_pixel(px, py, image::Rgb([0, 0, 0]));
                    }
                }
            }
        }
    }
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
    fn the_grid_is_sized_by_the_widest_of_image_and_label() {
        use super::Layout;
        // 96x64 images, "euler / simple" (14 characters: 112 + 4 pixels wide), 2 x 3 cells.
        let l = Layout::new(2, 3, 96, 64, 14);
        assert_eq!(l.cell_w, 116);
        assert_eq!((l.width, l.height), (4 + 3 * 120, 4 + 2 * (12 + 64 + 4)));
        assert_eq!(l.cell(1, 2), (4 + 2 * 120, 4 + 80));
        // A narrow label leaves the image width.
        assert_eq!(Layout::new(1, 1, 96, 64, 3).cell_w, 96);
    }

    #[test]
    fn labels_are_drawn_in_black_from_the_font() {
        let mut c = image::RgbImage::from_pixel(20, 10, image::Rgb([255, 255, 255]));
        super::draw_text(&mut c, 1, 1, "|");
        // font8x8's '|' is a broken bar: columns 3 and 4 inked in rows 0-2 and 4-6.
        for gy in 0..8 {
            for gx in 0..8 {
                let ink = (gx == 3 || gx == 4) && gy != 3 && gy != 7;
                let (x, y) = (1 + gx, 1 + gy);
                assert_eq!(c.get_pixel(x, y).0 == [0, 0, 0], ink, "({x}, {y})");
            }
        }
        assert_eq!(c.get_pixel(12, 3).0, [255, 255, 255]);
    }

    #[test]
    fn different_sizes_are_an_error() {
        let a = image::RgbImage::new(2, 2);
        let b = image::RgbImage::new(2, 3);
        assert!(diff(&a, &b).unwrap_err().to_string().contains("2x2 vs 2x3"));
    }
}

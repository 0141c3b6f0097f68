//! Reading input images and writing output images.
//!
//! Input: a file path, an `http(s)://` URL, a `data:` URI, raw base64 or bytes in memory, holding
//! PNG, JPEG or WebP. URLs are fetched under a [`FetchPolicy`] (timeout, size cap, and by default
//! no loopback, private, link-local or cloud-metadata addresses, so a server taking URLs from
//! the public cannot be used as a proxy into its own network). The decoded image is converted to RGB (alpha dropped), resized by [`SizeRule`] so both
//! sides are multiples of 16, and scaled to `[-1, 1]` as a `[1, 3, H, W]` tensor (row-major).
//!
//! Output: a decoded `[1, 3, H, W]` tensor in `[-1, 1]` becomes `clamp((x + 1) / 2, 0, 1)`,
//! rounded to 8 bits, and is encoded as PNG, JPEG or WebP, with optional text metadata (a PNG
//! `tEXt` chunk, a JPEG `COM` segment, a WebP `XMP ` chunk).

use base64::Engine as _;
use image::imageops::FilterType;
use image::{ImageFormat, RgbImage};
use std::fmt;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Most bytes an input image may have (file, download or base64 payload).
pub const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;
/// Most pixels a decoded input image may have (before resizing).
pub const MAX_INPUT_PIXELS: u64 = 64 * 1024 * 1024;
/// Timeout of an image download, connection included.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// An error reading or writing an image. Every variant names the input it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read image {path}: {message}")]
    Read { path: PathBuf, message: String },
    /// The download failed: host unknown or unreachable, connection broken, or an HTTP error.
    #[error("cannot download image {url}: {message}")]
    Download { url: String, message: String },
    /// The download did not finish within the policy's timeout.
    #[error("timed out downloading image {url}: {message}")]
    DownloadTimeout { url: String, message: String },
    /// The URL is not allowed by the fetch policy (scheme, or an address that is not public).
    #[error("image URL {url} refused: {message}")]
    UrlRefused { url: String, message: String },
    /// A data URI or base64 payload could not be decoded.
    #[error("invalid {what}: {message}")]
    Base64 { what: String, message: String },
    /// The input is larger than [`MAX_INPUT_BYTES`] or [`MAX_INPUT_PIXELS`].
    #[error("image {input} is too large: {message}")]
    TooLarge { input: String, message: String },
    /// The bytes are not a PNG, JPEG or WebP image, or the image is corrupt.
    #[error("cannot decode image {input}: {message}")]
    Decode { input: String, message: String },
    /// A size rule cannot be met.
    #[error("invalid image size: {0}")]
    Size(String),
    /// A tensor handed for encoding has the wrong shape or size.
    #[error("cannot encode image: {0}")]
    Tensor(String),
    /// The encoder failed.
    #[error("cannot encode {format} image: {message}")]
    Encode {
        format: OutputFormat,
        message: String,
    },
}

/// Where an input image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A file on disk.
    Path(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
    /// A `data:[<mime>][;base64],<payload>` URI.
    DataUri(String),
    /// Raw standard base64 (no prefix).
    Base64(String),
    /// Encoded image bytes already in memory.
    Bytes(Vec<u8>),
}

impl ImageSource {
    /// Classifies `s`: a URL by its scheme, a data URI by `data:`, an existing file as a path,
    /// a long string made only of base64 characters as base64, anything else as a path (so a
    /// missing file is reported as such).
    pub fn parse(s: &str) -> Self {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Self::Url(s.to_string());
        }
        if lower.starts_with("data:") {
            return Self::DataUri(s.to_string());
        }
        let path = Path::new(s);
        if !path.exists() && looks_like_base64(s) {
            return Self::Base64(s.to_string());
        }
        Self::Path(path.to_path_buf())
    }

    /// A short description for messages (payloads are not repeated in full).
    pub fn describe(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Url(u) => u.clone(),
            Self::DataUri(d) => format!("data URI ({} characters)", d.len()),
            Self::Base64(b) => format!("base64 input ({} characters)", b.len()),
            Self::Bytes(b) => format!("image data ({} bytes)", b.len()),
        }
    }

    /// Reads the encoded image bytes. URLs are fetched with [`FetchPolicy::trusted`]: the
    /// caller chose the URL (command line, library use), so local addresses are allowed. A
    /// server taking URLs from others uses [`ImageSource::read_bytes_with`] and the default
    /// policy instead.
    pub fn read_bytes(&self) -> Result<Vec<u8>, ImageError> {
        self.read_bytes_with(&FetchPolicy::trusted())
    }

    /// Reads the encoded image bytes, fetching URLs under `policy`.
    pub fn read_bytes_with(&self, policy: &FetchPolicy) -> Result<Vec<u8>, ImageError> {
        match self {
            Self::Path(p) => read_file(p),
            Self::Url(u) => fetch_url(u, policy),
            Self::DataUri(d) => decode_data_uri(d),
            Self::Base64(b) => decode_base64(b, "base64 image"),
            Self::Bytes(b) => Ok(b.clone()),
        }
    }
}

/// How image URLs are fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Time allowed for the whole download, name resolution and connection included.
    pub timeout: Duration,
    /// Most bytes the response body may have.
    pub max_bytes: u64,
    /// Whether hosts resolving to loopback, private, link-local, cloud-metadata and other
    /// non-public addresses may be fetched.
    pub allow_private: bool,
    /// Most redirects followed (each target is checked like the first URL).
    pub max_redirects: u32,
}

impl Default for FetchPolicy {
    /// The policy for URLs from untrusted callers: [`DOWNLOAD_TIMEOUT`], [`MAX_INPUT_BYTES`],
    /// public addresses only, at most 5 redirects.
    fn default() -> Self {
        Self {
            timeout: DOWNLOAD_TIMEOUT,
            max_bytes: MAX_INPUT_BYTES,
            allow_private: false,
            max_redirects: 5,
        }
    }
}

impl FetchPolicy {
    /// The default limits with local and private addresses allowed (for URLs the user chose).
    pub fn trusted() -> Self {
        Self {
            allow_private: true,
            ..Self::default()
        }
    }
}

/// Whether `ip` is an ordinary public unicast address: not loopback, private, link-local
/// (which holds the 169.254.169.254 metadata service), shared (CGNAT, 100.64.0.0/10), unique
/// local (fc00::/7, which holds fd00:ec2::254), multicast, documentation, benchmarking,
/// reserved or unspecified. IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64, 6to4)
/// are judged as the IPv4 address they carry.
pub fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let blocked = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240;
    !blocked
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::/96) carry the IPv4 address at the end.
    if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        if ip.is_unspecified() || ip.is_loopback() {
            return false;
        }
        let v4 = Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        return is_public_v4(v4);
    }
    // 6to4 (2002::/16) carries it in the second and third segments.
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        return is_public_v4(v4);
    }
    let blocked = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00
        || (seg[0] & 0xffc0) == 0xfe80
        || (seg[0] & 0xffc0) == 0xfec0
        || (seg[0] == 0x2001 && seg[1] == 0x0db8)
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]);
    !blocked
}

/// The resolver of guarded downloads: resolves like ureq's default, then refuses the host if
/// any address is not public. Checking here (rather than before the request) covers redirects
/// and leaves no window for the name to resolve differently between check and connect.
#[derive(Debug)]
struct PublicOnlyResolver;

/// The reason a guarded resolver refused a host.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl ureq::unversioned::resolver::Resolver for PublicOnlyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = ureq::unversioned::resolver::DefaultResolver::default()
            .resolve(uri, config, timeout)?;
        if let Some(bad) = addrs.iter().find(|a| !is_public_ip(a.ip())) {
            return Err(ureq::Error::Other(Box::new(Refused(format!(
                "host {} resolves to {}, which is not a public address (loopback, private, link-local and metadata addresses are refused)",
                uri.host().unwrap_or("?"),
                bad.ip()
            )))));
        }
        Ok(addrs)
    }
}

/// Downloads `url` under `policy`. Errors: [`ImageError::UrlRefused`] for a scheme other than
/// http(s) or a non-public address, [`ImageError::DownloadTimeout`] when the timeout runs out,
/// [`ImageError::TooLarge`] above the size cap, [`ImageError::Download`] otherwise.
pub fn fetch_url(url: &str, policy: &FetchPolicy) -> Result<Vec<u8>, ImageError> {
    let refused = |message: String| ImageError::UrlRefused {
        url: url.to_string(),
        message,
    };
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("http" | "https")) {
        return Err(refused(
            "only http:// and https:// URLs can be fetched".into(),
        ));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(policy.timeout))
        .max_redirects(policy.max_redirects)
        .proxy(None)
        .build();
    let agent = if policy.allow_private {
        ureq::Agent::new_with_config(config)
    } else {
        ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            PublicOnlyResolver,
        )
    };
    let err = |e: ureq::Error| match e {
        ureq::Error::Other(inner) if inner.downcast_ref::<Refused>().is_some() => {
            refused(inner.to_string())
        }
        ureq::Error::BadUri(m) => refused(format!("not a valid URL: {m}")),
        ureq::Error::Timeout(t) => ImageError::DownloadTimeout {
            url: url.to_string(),
            message: format!("no complete answer within {:?} ({t})", policy.timeout),
        },
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ImageError::DownloadTimeout {
                url: url.to_string(),
                message: format!("no complete answer within {:?} ({io})", policy.timeout),
            }
        }
        ureq::Error::StatusCode(code) => ImageError::Download {
            url: url.to_string(),
            message: format!("the server answered HTTP {code}"),
        },
        other => ImageError::Download {
            url: url.to_string(),
            message: other.to_string(),
        },
    };
    let mut response = agent.get(url).call().map_err(err)?;
    let mut bytes = Vec::new();
    response
        .body_mut()
        .as_reader()
        .take(policy.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            // ureq reports its own errors (a timeout among them) through the reader wrapped in
            // an io::Error.
            match e.downcast::<ureq::Error>() {
                Ok(u) => err(u),
                Err(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                    ImageError::DownloadTimeout {
                        url: url.to_string(),
                        message: io.to_string(),
                    }
                }
                Err(io) => ImageError::Download {
                    url: url.to_string(),
                    message: io.to_string(),
                },
            }
        })?;
    if bytes.len() as u64 > policy.max_bytes {
        return Err(ImageError::TooLarge {
            input: url.to_string(),
            message: format!("more than {} bytes", policy.max_bytes),
        });
    }
    Ok(bytes)
}

fn looks_like_base64(s: &str) -> bool {
    s.len() >= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\n' | b'\r'))
}

fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    let err = |message: String| ImageError::Read {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_INPUT_BYTES {
        return Err(ImageError::TooLarge {
            input: path.display().to_string(),
            message: format!("{} bytes, at most {MAX_INPUT_BYTES} allowed", meta.len()),
        });
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

fn decode_data_uri(uri: &str) -> Result<Vec<u8>, ImageError> {
    let err = |message: &str| ImageError::Base64 {
        what: "data URI".into(),
        message: message.into(),
    };
    let rest = uri.get(5..).ok_or_else(|| err("too short"))?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| err("no ',' separating the media type from the data"))?;
    if !meta.ends_with(";base64") {
        return Err(err(
            "only base64-encoded data URIs are supported (';base64,')",
        ));
    }
    decode_base64(payload, "data URI")
}

fn decode_base64(payload: &str, what: &str) -> Result<Vec<u8>, ImageError> {
    let cleaned: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    if cleaned.len() as u64 / 4 * 3 > MAX_INPUT_BYTES {
        return Err(ImageError::TooLarge {
            input: what.into(),
            message: format!("payload decodes to more than {MAX_INPUT_BYTES} bytes"),
        });
    }
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ImageError::Base64 {
            what: what.into(),
            message: e.to_string(),
        })
}

/// Checks that `bytes` start like a PNG, JPEG or WebP image and returns its size, without
/// decoding the pixels (cheap enough to run on every request; a corrupt body still fails
/// later, in [`decode_rgb`]).
pub fn probe(bytes: &[u8], input: &str) -> Result<(u32, u32), ImageError> {
    let decode_err = |message: String| ImageError::Decode {
        input: input.into(),
        message,
    };
    let format = image::guess_format(bytes)
        .map_err(|_| decode_err("not a PNG, JPEG or WebP image".into()))?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(decode_err(format!(
            "{format:?} images are not supported (PNG, JPEG or WebP)"
        )));
    }
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| decode_err(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(decode_err("the image is empty".into()));
    }
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS {
        return Err(ImageError::TooLarge {
            input: input.into(),
            message: format!("{w}x{h} pixels, at most {MAX_INPUT_PIXELS} allowed"),
        });
    }
    Ok((w, h))
}

/// Decodes PNG, JPEG or WebP bytes into an RGB image (alpha dropped).
pub fn decode_rgb(bytes: &[u8], input: &str) -> Result<RgbImage, ImageError> {
    let decode_err = |message: String| ImageError::Decode {
        input: input.into(),
        message,
    };
    let format = image::guess_format(bytes)
        .map_err(|_| decode_err("not a PNG, JPEG or WebP image".into()))?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(decode_err(format!(
            "{format:?} images are not supported (PNG, JPEG or WebP)"
        )));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_INPUT_PIXELS * 8);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| decode_err(e.to_string()))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(decode_err("the image is empty".into()));
    }
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS {
        return Err(ImageError::TooLarge {
            input: input.into(),
            message: format!("{w}x{h} pixels, at most {MAX_INPUT_PIXELS} allowed"),
        });
    }
    Ok(img.to_rgb8())
}

/// How an input image is sized before encoding.
///
/// The rule, in order: start from the image's own size `(W, H)` with scale `s = 1`; with a
/// `target` box `(bw, bh)`, `s = min(bw / W, bh / H)` (fit inside the box, up or down, keeping
/// the aspect ratio); with a megapixel cap `m`, if `s^2 W H > m * 10^6`, lower `s` to
/// `sqrt(m * 10^6 / (W H))`. Each side then becomes the nearest multiple of 16 of `s W` and
/// `s H` (at least 16; rounded down instead when rounding to nearest would break the cap). The
/// pixels are resampled with a Lanczos-3 filter, and not at all when the size is unchanged, so
/// an image whose sides are already multiples of 16 passes through untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SizeRule {
    /// Box `(width, height)` the image is fitted into, keeping its aspect ratio.
    pub target: Option<(u32, u32)>,
    /// Largest output size in megapixels (10^6 pixels).
    pub max_megapixels: Option<f64>,
}

impl SizeRule {
    /// The output size for an input of `width x height`.
    pub fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32), ImageError> {
        if width == 0 || height == 0 {
            return Err(ImageError::Size(format!("input is {width}x{height}")));
        }
        let (w, h) = (f64::from(width), f64::from(height));
        let mut s = 1.0f64;
        if let Some((bw, bh)) = self.target {
            if bw == 0 || bh == 0 {
                return Err(ImageError::Size(format!(
                    "target size {bw}x{bh}: both sides must be positive"
                )));
            }
            s = (f64::from(bw) / w).min(f64::from(bh) / h);
        }
        let cap = match self.max_megapixels {
            Some(m) if !(m.is_finite() && m * 1e6 >= 256.0) => {
                return Err(ImageError::Size(format!(
                    "megapixel cap {m}: must be at least 0.000256 (one 16x16 tile)"
                )));
            }
            Some(m) => Some(m * 1e6),
            None => None,
        };
        if let Some(c) = cap
            && s * s * w * h > c
        {
            s = (c / (w * h)).sqrt();
        }
        let near = |v: f64| (((v / 16.0) + 0.5).floor() * 16.0).max(16.0) as u32;
        let down = |v: f64| ((v / 16.0).floor() * 16.0).max(16.0) as u32;
        let (mut ow, mut oh) = (near(s * w), near(s * h));
        if let Some(c) = cap
            && f64::from(ow) * f64::from(oh) > c
        {
            (ow, oh) = (down(s * w), down(s * h));
            // Only the 16-pixel floor of the short side can still break the cap: the image is
            // too elongated to fit it at all.
            if f64::from(ow) * f64::from(oh) > c {
                return Err(ImageError::Size(format!(
                    "input is {width}x{height}: too elongated for the {} megapixel cap (with \
                     both sides at least 16 pixels it would be {ow}x{oh})",
                    c / 1e6
                )));
            }
        }
        if u64::from(ow) * u64::from(oh) > MAX_INPUT_PIXELS {
            return Err(ImageError::Size(format!(
                "{ow}x{oh} is more than {MAX_INPUT_PIXELS} pixels"
            )));
        }
        Ok((ow, oh))
    }
}

impl FromStr for SizeRule {
    type Err = ImageError;

    /// `WxH` (fit into that box) or `N` (fit into an `N x N` box: longer side `N`).
    fn from_str(s: &str) -> Result<Self, ImageError> {
        let parse = |v: &str| {
            v.trim().parse::<u32>().map_err(|_| {
                ImageError::Size(format!(
                    "'{s}': expected WIDTHxHEIGHT or a single side length, e.g. 1024x768 or 1024"
                ))
            })
        };
        let target = if let Some((a, b)) = s.split_once(['x', 'X']) {
            (parse(a)?, parse(b)?)
        } else {
            let n = parse(s)?;
            (n, n)
        };
        Ok(Self {
            target: Some(target),
            max_megapixels: None,
        })
    }
}

/// An input image ready for the VAE.
#[derive(Clone, Debug)]
pub struct InputImage {
    /// Values in `[-1, 1]`, `[1, 3, height, width]` row-major.
    pub data: Vec<f32>,
    /// Width in pixels (a multiple of 16).
    pub width: u32,
    /// Height in pixels (a multiple of 16).
    pub height: u32,
    /// Size of the image as decoded, before resizing.
    pub original: (u32, u32),
}

impl InputImage {
    /// The tensor shape `[1, 3, height, width]`.
    pub fn shape(&self) -> [usize; 4] {
        [1, 3, self.height as usize, self.width as usize]
    }
}

/// Reads, decodes, resizes and scales an input image.
pub fn load_image(source: &ImageSource, rule: &SizeRule) -> Result<InputImage, ImageError> {
    let bytes = source.read_bytes()?;
    image_from_bytes(&bytes, &source.describe(), rule)
}

/// Decodes, resizes and scales encoded image bytes; `input` names them in errors.
pub fn image_from_bytes(
    bytes: &[u8],
    input: &str,
    rule: &SizeRule,
) -> Result<InputImage, ImageError> {
    let rgb = decode_rgb(bytes, input)?;
    let original = rgb.dimensions();
    let (w, h) = rule.output_size(original.0, original.1)?;
    let rgb = if (w, h) == original {
        rgb
    } else {
        image::imageops::resize(&rgb, w, h, FilterType::Lanczos3)
    };
    Ok(InputImage {
        data: rgb_to_tensor(&rgb),
        width: w,
        height: h,
        original,
    })
}

/// `[1, 3, H, W]` values `p / 127.5 - 1` of an RGB image.
pub fn rgb_to_tensor(rgb: &RgbImage) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = f32::from(p[c]) / 127.5 - 1.0;
        }
    }
    out
}

/// An RGB image from a `[1, 3, H, W]` tensor in `[-1, 1]`: `clamp((x + 1) / 2, 0, 1)`, times 255,
/// rounded to nearest (so an input image survives a round trip exactly). NaN maps to 0.
pub fn tensor_to_rgb(data: &[f64], width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let plane = width as usize * height as usize;
    if data.len() != 3 * plane || plane == 0 {
        return Err(ImageError::Tensor(format!(
            "{} values for a {width}x{height} RGB image (expected {})",
            data.len(),
            3 * plane
        )));
    }
    let mut raw = vec![0u8; 3 * plane];
    for i in 0..plane {
        for c in 0..3 {
            let v = (0.5 * data[c * plane + i] + 0.5).clamp(0.0, 1.0);
            let v = if v.is_nan() { 0.0 } else { v };
            raw[3 * i + c] = (v * 255.0).round() as u8;
        }
    }
    RgbImage::from_raw(width, height, raw)
        .ok_or_else(|| ImageError::Tensor("buffer size mismatch".into()))
}

/// An output image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Lossless PNG (default).
    #[default]
    Png,
    /// JPEG at quality [`JPEG_QUALITY`].
    Jpeg,
    /// Lossless WebP.
    Webp,
}

/// Quality of JPEG output.
pub const JPEG_QUALITY: u8 = 95;

impl OutputFormat {
    /// Every format.
    pub const ALL: [Self; 3] = [Self::Png, Self::Jpeg, Self::Webp];

    /// The name used on the command line and in the API (`png`, `jpeg`, `webp`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The format a file extension stands for (`png`, `jpg`/`jpeg`, `webp`), case-insensitive.
    pub fn from_extension(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "jpeg" | "jpg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            _ => Err(format!("unknown format '{s}': expected png, jpeg or webp")),
        }
    }
}

/// Encodes `rgb` as `format`, with `metadata` (key, text) pairs stored in the file (PNG `tEXt`
/// chunks; for JPEG one `COM` segment and for WebP one `XMP ` chunk holding `key: text` lines).
pub fn encode_image(
    rgb: &RgbImage,
    format: OutputFormat,
    metadata: &[(String, String)],
) -> Result<Vec<u8>, ImageError> {
    let err = |message: String| ImageError::Encode { format, message };
    let (w, h) = rgb.dimensions();
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in metadata {
                enc.add_text_chunk(k.clone(), v.clone())
                    .map_err(|e| err(e.to_string()))?;
            }
            let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
            writer
                .write_image_data(rgb.as_raw())
                .map_err(|e| err(e.to_string()))?;
            writer.finish().map_err(|e| err(e.to_string()))?;
        }
        OutputFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY);
            rgb.write_with_encoder(enc)
                .map_err(|e| err(e.to_string()))?;
            if !metadata.is_empty() {
                out = insert_jpeg_comment(&out, &metadata_text(metadata)).map_err(err)?;
            }
        }
        OutputFormat::Webp => {
            let mut enc = image_webp::WebPEncoder::new(&mut out);
            if !metadata.is_empty() {
                enc.set_xmp_metadata(metadata_text(metadata).into_bytes());
            }
            enc.encode(rgb.as_raw(), w, h, image_webp::ColorType::Rgb8)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(out)
}

fn metadata_text(metadata: &[(String, String)]) -> String {
    metadata
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Inserts a `COM` segment right after the JPEG start-of-image marker.
fn insert_jpeg_comment(jpeg: &[u8], text: &str) -> Result<Vec<u8>, String> {
    if jpeg.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err("encoder output has no JPEG start marker".into());
    }
    let body = text.as_bytes();
    let body = &body[..body.len().min(65533)];
    let len = (body.len() + 2) as u16;
    let mut out = Vec::with_capacity(jpeg.len() + body.len() + 4);
    out.extend_from_slice(&jpeg[..2]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&jpeg[2..]);
    Ok(out)
}

/// Standard base64 of `bytes` (for API responses).
pub fn to_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The `tEXt` chunks of a PNG file as (key, text) pairs; `None` if `bytes` is not a PNG.
pub fn png_text_chunks(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().ok()?;
    Some(
        reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|c| (c.keyword.clone(), c.text.clone()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn size_rule_rounds_to_multiples_of_16() {
        let keep = SizeRule::default();
        assert_eq!(keep.output_size(64, 80).unwrap(), (64, 80));
        assert_eq!(keep.output_size(70, 90).unwrap(), (64, 96));
        assert_eq!(keep.output_size(5, 5).unwrap(), (16, 16));
        let boxed: SizeRule = "512".parse().unwrap();
        // 1000x500 fitted into 512x512 -> 512x256.
        assert_eq!(boxed.output_size(1000, 500).unwrap(), (512, 256));
        let capped = SizeRule {
            target: None,
            max_megapixels: Some(1.0),
        };
        let (w, h) = capped.output_size(4000, 3000).unwrap();
        assert!(u64::from(w) * u64::from(h) <= 1_000_000, "{w}x{h}");
        assert_eq!((w % 16, h % 16), (0, 0));
        // 4:3 kept within one tile of rounding.
        assert!((f64::from(w) / f64::from(h) - 4.0 / 3.0).abs() < 0.03);
        assert!("12x".parse::<SizeRule>().is_err());
    }

    #[test]
    fn the_megapixel_cap_holds_for_any_aspect_ratio() {
        let capped = SizeRule {
            target: None,
            max_megapixels: Some(0.25),
        };
        // Very elongated inputs: the 16-pixel floor of the short side cannot fit the cap.
        for (w, h) in [(65317, 23), (23, 65317), (65000, 1)] {
            let err = capped.output_size(w, h).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{w}x{h}")) && err.contains("cap"),
                "{err}"
            );
        }
        // Every other ratio gets an output within the cap, sides multiples of 16.
        for (w, h) in [
            (600, 1),
            (15000, 16),
            (4000, 3000),
            (1, 1),
            (9999, 37),
            (37, 9999),
        ] {
            let (ow, oh) = capped.output_size(w, h).unwrap();
            assert!(
                u64::from(ow) * u64::from(oh) <= 250_000,
                "{w}x{h} -> {ow}x{oh}"
            );
            assert_eq!((ow % 16, oh % 16), (0, 0));
        }
    }

    #[test]
    fn round_trip_is_exact_for_png_and_webp() {
        let img = gradient(32, 48);
        let t = rgb_to_tensor(&img);
        let back =
            tensor_to_rgb(&t.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), 32, 48).unwrap();
        assert_eq!(back, img);
        for fmt in [OutputFormat::Png, OutputFormat::Webp] {
            let bytes = encode_image(&img, fmt, &[("k".into(), "v".into())]).unwrap();
            let decoded = decode_rgb(&bytes, "test").unwrap();
            assert_eq!(decoded, img, "{fmt}");
        }
        let jpeg = encode_image(&img, OutputFormat::Jpeg, &[("k".into(), "v".into())]).unwrap();
        assert_eq!(decode_rgb(&jpeg, "test").unwrap().dimensions(), (32, 48));
        assert!(jpeg.windows(4).any(|w| w == b"k: v"));
    }

    #[test]
    fn png_metadata_is_readable() {
        let bytes = encode_image(
            &gradient(16, 16),
            OutputFormat::Png,
            &[("model".into(), "demo".into())],
        )
        .unwrap();
        assert_eq!(
            png_text_chunks(&bytes).unwrap(),
            vec![("model".to_string(), "demo".to_string())]
        );
    }

    #[test]
    fn sources_are_classified_and_decoded() {
        let png = encode_image(&gradient(16, 16), OutputFormat::Png, &[]).unwrap();
        let b64 = to_base64(&png);
        assert_eq!(ImageSource::parse(&b64), ImageSource::Base64(b64.clone()));
        let uri = format!("data:image/png;base64,{b64}");
        let src = ImageSource::parse(&uri);
        assert!(matches!(src, ImageSource::DataUri(_)));
        assert_eq!(src.read_bytes().unwrap(), png);
        assert!(matches!(
            ImageSource::parse("https://example.com/a.png"),
            ImageSource::Url(_)
        ));
        assert!(matches!(
            ImageSource::parse("no/such/file.png"),
            ImageSource::Path(_)
        ));
        let img = load_image(&ImageSource::Base64(b64), &SizeRule::default()).unwrap();
        assert_eq!(img.shape(), [1, 3, 16, 16]);
        assert!(img.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_input() {
        let e = ImageSource::parse("no/such/file.png")
            .read_bytes()
            .unwrap_err();
        assert!(e.to_string().contains("no/such/file.png"), "{e}");
        let e = decode_rgb(b"definitely not an image", "junk.png").unwrap_err();
        assert!(e.to_string().contains("junk.png"), "{e}");
        let png = encode_image(&gradient(16, 16), OutputFormat::Png, &[]).unwrap();
        let e = decode_rgb(&png[..png.len() / 2], "half.png").unwrap_err();
        assert!(e.to_string().contains("half.png"), "{e}");
        assert!(
            ImageSource::DataUri("data:image/png,abc".into())
                .read_bytes()
                .is_err()
        );
        assert!(ImageSource::Base64("@@@@".into()).read_bytes().is_err());
        assert!(tensor_to_rgb(&[0.0; 5], 2, 2).is_err());
    }
}

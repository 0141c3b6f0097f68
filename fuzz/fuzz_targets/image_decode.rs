//! Arbitrary bytes as an input image: decoding, the resize rule and the tensor conversion must
//! return an error or a well-formed image, never panic, for PNG, JPEG, WebP or garbage.
#![no_main]

use flux_pipeline::image_io::{SizeRule, decode_rgb, image_from_bytes, rgb_to_tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rgb) = decode_rgb(data, "fuzz input") else {
        return;
    };
    let (w, h) = rgb.dimensions();
    assert_eq!(rgb_to_tensor(&rgb).len(), 3 * w as usize * h as usize);
    // The full input path: the size rule (multiples of 16) and the scaling to [-1, 1].
    let rule = SizeRule {
        target: None,
        max_megapixels: Some(0.25),
    };
    if let Ok(img) = image_from_bytes(data, "fuzz input", &rule) {
        assert_eq!(img.width % 16, 0);
        assert_eq!(img.height % 16, 0);
        assert_eq!(img.data.len(), 3 * img.width as usize * img.height as usize);
        assert!(img.data.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
});

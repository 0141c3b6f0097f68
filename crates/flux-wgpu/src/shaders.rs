//! The WGSL sources, one file per kernel family under `shaders/wgsl/`, compiled into the crate.
//! Families that read stored weights get the packed-weight helpers prepended.

/// The shared packed-weight access helpers (`load_w`).
const WEIGHTS: &str = include_str!("../../../shaders/wgsl/weights.wgsl");
/// `load_w` for f16 weights read as `array<f16>` (adapters with `shader-f16`).
const WEIGHTS_F16: &str = include_str!("../../../shaders/wgsl/weights_f16.wgsl");
/// How a weight-reading shader declares its weight buffer (packed words).
const PACKED_DECL: &str = "var<storage, read> wbuf: array<u32>;";

/// One shader module.
pub(crate) struct Shader {
    pub(crate) name: &'static str,
    body: &'static str,
    reads_weights: bool,
}

impl Shader {
    /// Whether the shader reads a stored weight (and so has an `array<f16>` variant).
    pub(crate) fn reads_weights(&self) -> bool {
        self.reads_weights
    }

    /// The complete WGSL source; `native_f16` gives the variant that reads f16 weights as
    /// `array<f16>` (only for weight-reading shaders, on devices with `shader-f16`).
    pub(crate) fn source(&self, native_f16: bool) -> String {
        match (self.reads_weights, native_f16) {
            (true, true) => format!(
                "{WEIGHTS_F16}\n{}",
                self.body
                    .replace(PACKED_DECL, "var<storage, read> wbuf: array<f16>;")
            ),
            (true, false) => format!("{WEIGHTS}\n{}", self.body),
            (false, _) => self.body.to_string(),
        }
    }
}

macro_rules! shader {
    ($id:ident, $file:literal, $weights:expr) => {
        pub(crate) const $id: Shader = Shader {
            name: $file,
            body: include_str!(concat!("../../../shaders/wgsl/", $file)),
            reads_weights: $weights,
        };
    };
}

shader!(ELEMENTWISE, "elementwise.wgsl", false);
shader!(REDUCE, "reduce.wgsl", false);
shader!(CASTS, "casts.wgsl", true);
shader!(MATMUL, "matmul.wgsl", true);
shader!(NORMS, "norms.wgsl", false);
shader!(MODULATION, "modulation.wgsl", false);
shader!(ROPE, "rope.wgsl", false);
shader!(SOFTMAX, "softmax.wgsl", false);
shader!(ATTENTION, "attention.wgsl", false);
shader!(ACTIVATIONS, "activations.wgsl", false);
shader!(CONV, "conv.wgsl", true);
shader!(LAYOUT, "layout.wgsl", false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_weight_reading_shader_has_an_f16_variant() {
        for shader in [&CASTS, &MATMUL, &CONV] {
            assert!(shader.reads_weights);
            assert_eq!(
                shader.body.matches(PACKED_DECL).count(),
                1,
                "{}",
                shader.name
            );
            let f16 = shader.source(true);
            assert!(f16.starts_with("// Half-precision") && f16.contains("enable f16;"));
            assert!(f16.contains("wbuf: array<f16>;") && !f16.contains(PACKED_DECL));
        }
        for shader in [
            &ELEMENTWISE,
            &REDUCE,
            &NORMS,
            &MODULATION,
            &ROPE,
            &SOFTMAX,
            &ATTENTION,
            &ACTIVATIONS,
            &LAYOUT,
        ] {
            assert!(
                !shader.reads_weights && !shader.body.contains("wbuf"),
                "{}",
                shader.name
            );
            assert_eq!(shader.source(true), shader.source(false));
        }
    }
}

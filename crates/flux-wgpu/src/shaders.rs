//! The WGSL sources, one file per kernel family under `shaders/wgsl/`, compiled into the crate.
//! Families that read stored weights get the packed-weight helpers prepended.

/// The shared packed-weight access helpers (`load_w`).
const WEIGHTS: &str = include_str!("../../../shaders/wgsl/weights.wgsl");

/// One shader module.
pub(crate) struct Shader {
    pub(crate) name: &'static str,
    body: &'static str,
    reads_weights: bool,
}

impl Shader {
    /// The complete WGSL source.
    pub(crate) fn source(&self) -> String {
        if self.reads_weights {
            format!("{WEIGHTS}\n{}", self.body)
        } else {
            self.body.to_string()
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

// Half-precision weight access for adapters with `shader-f16`: the variant of `weights.wgsl`
// used for f16 weights there. The including shader's `wbuf` is declared `array<f16>` in this
// variant (the same little-endian bytes), so an element is one load and one exact widening.

enable f16;

// Always 1 (f16) where this variant is used; declared so the callers' constant applies.
override WDTYPE: u32 = 1u;

// Element `i` of the weight, widened to f32.
fn load_w(i: u32) -> f32 {
    return f32(wbuf[i]);
}

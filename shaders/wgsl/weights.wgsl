// Packed weight access, prepended to every shader that reads a stored weight.
//
// The including shader declares `wbuf: array<u32>`; elements are little-endian f32, f16, bf16
// (two per word, low half first) or fp8 e4m3fn (four per word), selected by WDTYPE.
// Widening is exact; the per-tensor scale is applied by the caller.

// 0: f32, 1: f16, 2: bf16, 3: fp8 e4m3fn.
override WDTYPE: u32 = 0u;

fn f16_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // Subnormal: m * 2^-24, exact in f32.
        let v = f32(m) * 5.9604644775390625e-8;
        return select(v, -v, s != 0u);
    }
    if (e == 31u) {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

fn fp8_to_f32(b: u32) -> f32 {
    let s = (b & 0x80u) << 24u;
    let e = (b >> 3u) & 0xfu;
    let m = b & 7u;
    if (e == 15u && m == 7u) {
        return bitcast<f32>(0x7fc00000u);
    }
    if (e == 0u) {
        // Subnormal: m / 8 * 2^-6.
        let v = f32(m) * 0.001953125;
        return select(v, -v, s != 0u);
    }
    return bitcast<f32>(s | ((e + 120u) << 23u) | (m << 20u));
}

// Element `i` of the packed weight, widened to f32.
fn load_w(i: u32) -> f32 {
    switch WDTYPE {
        case 1u: {
            return f16_to_f32((wbuf[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu);
        }
        case 2u: {
            let w = wbuf[i >> 1u];
            if ((i & 1u) == 0u) {
                return bitcast<f32>(w << 16u);
            }
            return bitcast<f32>(w & 0xffff0000u);
        }
        case 3u: {
            return fp8_to_f32((wbuf[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu);
        }
        default: {
            return bitcast<f32>(wbuf[i]);
        }
    }
}

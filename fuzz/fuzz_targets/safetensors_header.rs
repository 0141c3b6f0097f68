//! Arbitrary bytes as a safetensors checkpoint: the loader must return an error or tensors that
//! read back within bounds, and loading a Flux transformer from them must never panic.
#![no_main]

use flux_kernels::{Cpu, DType, SamplerOps};
use flux_model::transformer::FluxTransformer;
use flux_model::weights::Weights;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = Weights::from_bytes(data.to_vec(), "fuzz.safetensors") else {
        return;
    };
    for name in w.names() {
        let Some(shape) = w.shape(name).map(<[usize]>::to_vec) else {
            continue;
        };
        if shape.iter().product::<usize>() > 1 << 20 {
            continue;
        }
        if let Ok(t) = w.get(&Cpu, name, &shape) {
            let _ = Cpu.download_f64(&t);
        }
    }
    let _ = FluxTransformer::load(&Cpu, &w, DType::F32);
});

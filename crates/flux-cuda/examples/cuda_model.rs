//! Builds the CPU model of the CUDA libraries (`tests/emu/driver.cpp`, `tests/emu/blas.cpp`
//! over every kernel of `shaders/cuda`) into a folder: `libcuda.so`, `libcublas.so`,
//! `libcublasLt.so`. With that folder (and NVRTC's) first in `LD_LIBRARY_PATH`, the CUDA
//! backend runs on the CPU: its GPU tests, `flux parity --backend cuda`, `flux img2img
//! --backend cuda`. See `.ci/run` and the README's CUDA section.
//!
//! Usage: `cargo run -p flux-cuda --example cuda_model -- DIR`

#[path = "../tests/emu/unit.rs"]
mod unit;

fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: cuda_model DIR");
        std::process::exit(2);
    };
    match unit::build_model_libraries(std::path::Path::new(&dir)) {
        Ok(()) => println!(
            "CPU model of the CUDA libraries in {}",
            dir.to_string_lossy()
        ),
        Err(e) => {
            eprintln!("cuda_model: {e}");
            std::process::exit(1);
        }
    }
}

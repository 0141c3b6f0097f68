#!/usr/bin/env bash
# Builds, on a CPU machine, what scripts/gpu-check.sh needs on a GPU machine (which has no
# crate registry): into gpu-carry/ (git-ignored)
#   flux                     release CLI with the cuda and wgpu features
#   cuda_bench               the CUDA benches (GEMM, attention, one flux-dev step)
#   wgpu_ops                 the wgpu benches at real sizes (scripts/wgpu-bench.sh --binary)
#   gpu-tests.tar.zst        nextest archive of the flux-cuda and flux-wgpu tests (the CUDA
#                            ones are ignored unless run with --run-ignored)
#   cargo-nextest            the nextest binary that runs the archive there
# Copy the repository with gpu-carry/ to the GPU machine and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-carry
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flux-kernels/target}"
# The kernel compile tests are required (not ignored) in the archive.
export FLUX_REQUIRE_NVRTC=1
mkdir -p "$OUT"

echo "== cuda_bench (release)"
cargo build --release -p flux-cuda --example cuda_bench
cp "$CARGO_TARGET_DIR/release/examples/cuda_bench" "$OUT/cuda_bench"

echo "== flux (release, --features cuda,wgpu)"
cargo build --release -p flux-cli --features cuda,wgpu
cp "$CARGO_TARGET_DIR/release/flux" "$OUT/flux"

echo "== wgpu_ops (the wgpu benches)"
scripts/wgpu-bench.sh --build-only "$OUT"

echo "== nextest archive of flux-cuda and flux-wgpu (release profile: small binaries)"
cargo nextest archive --release -p flux-cuda -p flux-wgpu \
    --archive-file "$OUT/gpu-tests.tar.zst"

NEXTEST="$(command -v cargo-nextest || true)"
if [ -z "$NEXTEST" ]; then
    echo "cargo-nextest not found: install it with 'cargo install cargo-nextest --locked'" >&2
    exit 1
fi
cp "$NEXTEST" "$OUT/cargo-nextest"

for f in "$OUT/flux" "$OUT/cuda_bench" "$OUT/wgpu_ops" "$OUT/cargo-nextest"; do
    if [ -f "$f" ] && command -v strip >/dev/null 2>&1; then strip "$f" || true; fi
done
du -sh "$OUT"/*
du -sh "$OUT"

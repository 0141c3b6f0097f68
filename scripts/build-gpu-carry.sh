#!/usr/bin/env bash
# Builds, on a CPU machine, what scripts/gpu-check.sh needs on a GPU machine (which has no
# crate registry): into gpu-carry/ (git-ignored)
#   flux                     release CLI with the cuda feature (when flux-cli has that feature)
#   cuda_bench               the CUDA benches (GEMM, attention, one flux-dev step)
#   flux-cuda-tests.tar.zst  nextest archive of the flux-cuda tests (the GPU ones are ignored
#                            unless run with --run-ignored)
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

if sed -n '/^\[features\]/,/^\[/p' crates/flux-cli/Cargo.toml | grep -q '^cuda *='; then
    echo "== flux (release, --features cuda)"
    cargo build --release -p flux-cli --features cuda
    cp "$CARGO_TARGET_DIR/release/flux" "$OUT/flux"
else
    echo "== flux-cli has no cuda feature yet: no flux binary in $OUT" >&2
    rm -f "$OUT/flux"
fi

echo "== nextest archive of flux-cuda (release profile: small binaries)"
cargo nextest archive --release -p flux-cuda --archive-file "$OUT/flux-cuda-tests.tar.zst"

NEXTEST="$(command -v cargo-nextest || true)"
if [ -z "$NEXTEST" ]; then
    echo "cargo-nextest not found: install it with 'cargo install cargo-nextest --locked'" >&2
    exit 1
fi
cp "$NEXTEST" "$OUT/cargo-nextest"

for f in "$OUT/flux" "$OUT/cuda_bench" "$OUT/cargo-nextest"; do
    if [ -f "$f" ] && command -v strip >/dev/null 2>&1; then strip "$f" || true; fi
done
du -sh "$OUT"/*
du -sh "$OUT"

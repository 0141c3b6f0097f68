#!/usr/bin/env bash
# Benchmarks of the wgpu backend at real sizes on whatever GPU wgpu picks (see benches/wgpu_ops.rs):
# square f32 matmuls and bf16-weight linears (FLOP/s, compared with the card's f32 peak), flash
# attention at 4608 tokens x 24 heads x 128, the fused lincomb, and one full Flux.1-dev
# transformer forward at 1024x1024 (random bf16 weights, about 24 GB of device memory).
#
#   scripts/wgpu-bench.sh                   build with cargo and run
#   scripts/wgpu-bench.sh --build-only DIR  build the bench binary and copy it to DIR (for a GPU
#                                           machine without a crate registry)
#   scripts/wgpu-bench.sh --binary PATH     run a binary made by --build-only
#
# Environment: PEAK_GFLOPS (f32 peak of the card; guessed from nvidia-smi for H100/H200),
# FLUX_BENCH_BLOCKS=D,S (double/single blocks of the forward; default 19,38), WGPU_BACKEND.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="run"
arg=""
case "${1:-}" in
    --build-only) mode="build"; arg="${2:?--build-only needs a directory}" ;;
    --binary) mode="binary"; arg="${2:?--binary needs a path}" ;;
    "") ;;
    *) echo "usage: $0 [--build-only DIR | --binary PATH]" >&2; exit 2 ;;
esac

export FLUX_BENCH_LARGE=1
# Scratch files made below; removed on exit, whatever the outcome.
SCRATCH=()
trap 'rm -rf "${SCRATCH[@]}"' EXIT
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    SCRATCH+=("$XDG_RUNTIME_DIR")
fi
export XDG_RUNTIME_DIR

build() {
    cargo bench -p flux-benches --bench wgpu_ops --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*wgpu_ops[^"]*"' | tail -n 1 | cut -d'"' -f4
}

case "$mode" in
    build)
        bin="$(build)"
        mkdir -p "$arg"
        cp "$bin" "$arg/wgpu_ops"
        echo "copied $bin to $arg/wgpu_ops; run: scripts/wgpu-bench.sh --binary $arg/wgpu_ops"
        exit 0
        ;;
    binary) bin="$arg" ;;
    run) bin="$(build)" ;;
esac

log="$(mktemp)"
SCRATCH+=("$log")
"$bin" --bench 2>&1 | tee "$log"

peak="${PEAK_GFLOPS:-}"
if [ -z "$peak" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
    case "$gpu" in
        *H100*|*H200*) peak=66900 ;;  # SXM f32 (non-tensor-core) peak; wgpu has no tensor cores
    esac
    echo "GPU: $gpu"
fi

echo
echo "== summary (GFLOP/s = criterion's Gelem/s; median of the three thrpt figures) =="
awk -v peak="$peak" '
    /^wgpu_/ { name = $1 }
    /thrpt:/ {
        v = $4; u = $5
        if (u ~ /^Gelem/) g = v; else if (u ~ /^Melem/) g = v / 1000; else if (u ~ /^Telem/) g = v * 1000; else next
        if (peak != "") printf "%-60s %10.1f GFLOP/s  %5.1f%% of %s\n", name, g, 100 * g / peak, peak
        else printf "%-60s %10.1f GFLOP/s\n", name, g
    }
' "$log"

#!/usr/bin/env bash
# Builds, on a CPU machine, what scripts/gpu-check.sh needs on a GPU machine (which has no
# crate registry), as one xz archive gpu-carry/bundle.tar.xz (git-ignored) holding:
#   flux         release CLI with the cuda and wgpu features
#   cuda_bench   the CUDA benches (GEMM, attention, one flux-dev step)
#   wgpu_ops     the wgpu benches at real sizes (scripts/wgpu-bench.sh --binary)
#   tests/       the test binaries of flux-cuda and flux-wgpu (release profile), named
#                CRATE-TARGET; gpu-check.sh runs each with --include-ignored (not the
#                CPU-only checks that read the source tree or need the CPU model of the CUDA
#                libraries: the kernels' CPU model, the launch-site check, the model's trace)
# Everything is stripped and compressed: the repository with the bundle must stay under the
# 64 MiB a device call carries (the script prints both sizes).
# Copy the repository with gpu-carry/ to the GPU machine and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=gpu-carry
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flux-kernels/target}"
# The kernel compile tests and the wgpu device tests are required (not ignored) in the bundle.
export FLUX_REQUIRE_NVRTC=1 FLUX_REQUIRE_ADAPTER=1
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/tests"

echo "== cuda_bench (release)"
cargo build --release -p flux-cuda --example cuda_bench
cp "$CARGO_TARGET_DIR/release/examples/cuda_bench" "$STAGE/cuda_bench"

echo "== flux (release, --features cuda,wgpu)"
cargo build --release -p flux-cli --features cuda,wgpu
cp "$CARGO_TARGET_DIR/release/flux" "$STAGE/flux"

echo "== wgpu_ops (the wgpu benches)"
scripts/wgpu-bench.sh --build-only "$STAGE"

echo "== test binaries of flux-cuda and flux-wgpu (release)"
cargo test --release -p flux-cuda -p flux-wgpu --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        crate = os.path.basename(os.path.dirname(m["manifest_path"]))
        print(crate + "-" + m["target"]["name"] + "\t" + m["executable"])
' | while IFS=$'\t' read -r name exe; do
        # CPU-only checks that read the source tree (CI runs them): no use on the GPU machine.
        case "$name" in flux-cuda-emulated | flux-cuda-launch_sites | flux-cuda-model_trace) continue ;; esac
        cp "$exe" "$STAGE/tests/$name"
        echo "  $name"
    done
[ -n "$(ls "$STAGE/tests")" ] || { echo "no test binaries were built" >&2; exit 1; }

if command -v strip >/dev/null 2>&1; then
    find "$STAGE" -type f -exec strip {} + 2>/dev/null || true
fi
rm -rf "$OUT"
mkdir -p "$OUT"
tar -C "$STAGE" -cf - . | xz -9 -T0 >"$OUT/bundle.tar.xz"

bundle=$(stat -c %s "$OUT/bundle.tar.xz")
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
limit=$((64 * 1024 * 1024))
echo "bundle: $((bundle / 1024)) KiB; tracked files: $((tracked / 1024)) KiB; together $(((bundle + tracked) / 1024)) KiB of the $((limit / 1024)) KiB a device call carries"
if [ $((bundle + tracked)) -ge "$limit" ]; then
    echo "too large for one device call" >&2
    exit 1
fi

#!/usr/bin/env bash
# CUDA and wgpu checks on a GPU machine, from the bundle scripts/build-gpu-carry.sh made
# (gpu-carry/bundle.tar.xz, unpacked into a temporary folder):
#   1. the flux-cuda and flux-wgpu test binaries with --include-ignored (backend conformance
#      against the CPU on CUDA and on the GPU's Vulkan driver, every sampler on the device
#      against the CPU, bf16 linear at a Flux shape, tensor-core attention, NVRTC compile),
#   2. `flux parity --backend cuda` over the reference data (sampler and tiny-model cases), and
#      `flux img2img --backend cuda` on the demo model against the CPU,
#   3. the CUDA benches: bf16 GEMM at the Flux shapes as a fraction of peak, attention (exact
#      and tensor-core) at 4608 tokens 24x128, one flux-dev transformer step at 1024x1024
#      with random bf16 weights,
#   4. `flux parity --backend wgpu` on the GPU,
#   5. the wgpu benches (scripts/wgpu-bench.sh: matmul GFLOP/s against the f32 peak,
#      attention, a flux-dev forward at 1024x1024).
# GPU_CHECK_STEPS="1 2 3" (say) runs only those steps, to split the work over several shorter
# sessions on the GPU machine. Ends with a table of the steps run; exits non-zero when any failed.
# Usage: scripts/gpu-check.sh [CARRY_DIR] [-- cuda_bench args]   (CARRY_DIR: gpu-carry)
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY="gpu-carry"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then CARRY="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
BENCH_ARGS=("$@")

if [ ! -f "$CARRY/bundle.tar.xz" ]; then
    echo "no $CARRY/bundle.tar.xz: run scripts/build-gpu-carry.sh on a CPU machine first" >&2
    exit 2
fi
# Scratch folders made below; removed on exit, whatever the outcome.
SCRATCH=()
trap 'rm -rf "${SCRATCH[@]}"' EXIT
BIN="$(mktemp -d)"
SCRATCH+=("$BIN")
if command -v xz >/dev/null 2>&1; then
    tar -xJf "$CARRY/bundle.tar.xz" -C "$BIN"
else
    python3 -m tarfile -e "$CARRY/bundle.tar.xz" "$BIN"
fi || { echo "could not unpack $CARRY/bundle.tar.xz" >&2; exit 2; }

# The backend loads libcuda, libnvrtc and libcublas by their unversioned names (or .so.12):
# collect the CUDA library folders (toolkit, pip wheels) and give each library that name.
LIBDIRS=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do
    [ -d "$d" ] && LIBDIRS+=("$d")
done
if command -v python3 >/dev/null 2>&1; then
    while IFS= read -r d; do [ -n "$d" ] && LIBDIRS+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for d in glob.glob(r + "/nvidia/*/lib") + glob.glob(r + "/nvidia/cu*/lib"):
        if d not in seen:
            seen.add(d)
            print(d)
PY
)
fi
SHIM="$(mktemp -d)"
SCRATCH+=("$SHIM")
for name in nvrtc cublas cublasLt; do
    found=""
    for d in "${LIBDIRS[@]}"; do
        for f in "$d/lib$name.so" "$d"/lib"$name".so.1[0-9]*; do
            if [ -e "$f" ]; then found="$f"; break 2; fi
        done
    done
    if [ -n "$found" ]; then
        ln -sf "$found" "$SHIM/lib$name.so"
        echo "lib$name: $found"
    else
        echo "lib$name: not found in ${LIBDIRS[*]:-no CUDA library folder} (ldconfig may still have it)"
    fi
done
LD_LIBRARY_PATH="$SHIM$(printf ':%s' "${LIBDIRS[@]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
for d in /usr/local/cuda/include "${LIBDIRS[@]/%\/lib/\/include}"; do
    if [ -f "$d/cuda_bf16.h" ]; then export FLUX_CUDA_INCLUDE="$d"; break; fi
done

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L

declare -a NAMES RESULTS
record() { NAMES+=("$1"); RESULTS+=("$2"); }
STEPS="${GPU_CHECK_STEPS:-1 2 3 4 5}"
want() { [[ " $STEPS " == *" $1 "* ]]; }

# A GPU machine has Vulkan through the NVIDIA driver: a missing adapter fails the wgpu tests.
export FLUX_REQUIRE_ADAPTER=1
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"
    SCRATCH+=("$XDG_RUNTIME_DIR")
fi
export XDG_RUNTIME_DIR

if want 1; then
    echo
    echo "== 1. flux-cuda and flux-wgpu tests, GPU tests included"
    failed_tests=()
    for t in "$BIN"/tests/*; do
        echo "-- $(basename "$t")"
        "$t" --include-ignored || failed_tests+=("$(basename "$t")")
    done
    if [ ${#failed_tests[@]} -eq 0 ]; then
        record "tests (--include-ignored)" "pass"
    else
        record "tests (--include-ignored)" "FAIL: ${failed_tests[*]}"
    fi
fi

# `flux parity --backend $1 testdata` as step $2.
parity() {
    want "$2" || return 0
    echo
    echo "== $2. flux parity --backend $1 testdata"
    if "$BIN/flux" parity --backend "$1" testdata; then
        record "flux parity --backend $1" "pass"
    else
        record "flux parity --backend $1" "FAIL"
    fi
}

parity cuda 2

# `flux img2img --backend cuda` on the demo model against the CPU run (both f32: the bounds of
# crates/flux-cli/tests/img2img_cuda.rs, 2 levels and 45 dB).
if want 2; then
    echo
    echo "== 2. flux img2img --backend cuda against --backend cpu"
    IMG="$(mktemp -d)"
    SCRATCH+=("$IMG")
    img2img() {
        "$BIN/flux" img2img --image testdata/images/demo.png --prompt "a red cab" --steps 3 \
            --seed 5 --backend "$1" --out "$IMG/$1.png"
    }
    if img2img cpu && img2img cuda &&
        "$BIN/flux" compare "$IMG/cpu.png" "$IMG/cuda.png" --max-abs 2 --min-psnr 45; then
        record "flux img2img --backend cuda" "pass"
    else
        record "flux img2img --backend cuda" "FAIL"
    fi
fi

if want 3; then
    echo
    echo "== 3. CUDA benches"
    if "$BIN/cuda_bench" "${BENCH_ARGS[@]}"; then
        record "cuda_bench" "pass (table above)"
    else
        record "cuda_bench" "FAIL"
    fi
fi

parity wgpu 4

if want 5; then
    echo
    echo "== 5. wgpu benches"
    if scripts/wgpu-bench.sh --binary "$BIN/wgpu_ops"; then
        record "wgpu benches" "pass (summary above)"
    else
        record "wgpu benches" "FAIL"
    fi
fi

echo
echo "| step | result |"
echo "|---|---|"
status=0
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} |"
    case "${RESULTS[$i]}" in FAIL*) status=1 ;; esac
done
exit "$status"

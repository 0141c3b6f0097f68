#!/usr/bin/env bash
# The samplers' overhead target, measured: every sampler's own time per step (`flux bench
# sampler`, denoiser excluded) against the time to read and write the latent three times
# (`flux bench copy`), on this machine, in one markdown table.
#
#   scripts/sampler-overhead.sh [SHAPE] [THREADS] [ROUNDS] [STEPS]
#
# SHAPE defaults to 1,16,128,128, THREADS to 2, ROUNDS to 3, STEPS to 20. Each round runs every
# sampler once in turn (so a burst of load on the machine spreads over all of them instead of
# landing on one), and the copy between samplers; a figure is the median over the rounds of
# each run's own median. Set FLUX to a built binary to skip the build.
set -euo pipefail
cd "$(dirname "$0")/.."

shape=${1:-1,16,128,128}
threads=${2:-2}
rounds=${3:-3}
steps=${4:-20}

if [[ -z "${FLUX:-}" ]]; then
    cargo build --release --quiet -p flux-cli
    FLUX="${CARGO_TARGET_DIR:-target}/release/flux"
fi
[[ -x "$FLUX" ]] || { echo "sampler-overhead: no flux binary at $FLUX" >&2; exit 2; }

mapfile -t samplers < <("$FLUX" samplers | awk '{print $1}')
(( ${#samplers[@]} > 0 )) || { echo "sampler-overhead: 'flux samplers' listed nothing" >&2; exit 2; }

results=$(mktemp)
trap 'rm -f "$results"' EXIT

value() { tr ' ' '\n' | sed -n "s/^$1=//p"; }

for (( r = 1; r <= rounds; r++ )); do
    for s in "${samplers[@]}"; do
        line=$("$FLUX" bench sampler --sampler "$s" --steps "$steps" --shape "$shape" --threads "$threads")
        echo "$s $(value overhead_per_step_s <<<"$line")" >>"$results"
        line=$("$FLUX" bench copy --shape "$shape" --threads "$threads")
        echo "__copy $(value copy_s <<<"$line")" >>"$results"
    done
    echo "round $r of $rounds done" >&2
done

# Medians per name, then the table in the order `flux samplers` lists the names.
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
copy=$(awk '$1 == "__copy" {print $2}' "$results" | median)
three=$(awk -v c="$copy" 'BEGIN {printf "%.6e", 3 * c}')

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)
simd=$(grep -o -m1 -w 'avx512f' /proc/cpuinfo 2>/dev/null || grep -o -m1 -w 'avx2' /proc/cpuinfo 2>/dev/null || echo "no AVX2")
echo "shape $shape f32, $steps steps, $threads threads, medians of $rounds rounds; ${cpu:-unknown CPU} ($simd)"
echo
awk -v c="$copy" 'BEGIN {printf "one read and write of the latent: %.1f us; target (three): %.1f us\n\n", c * 1e6, 3 * c * 1e6}'
echo "| sampler | overhead per step (us) | / target | within target |"
echo "|---|---|---|---|"
met=0
for s in "${samplers[@]}"; do
    o=$(awk -v s="$s" '$1 == s {print $2}' "$results" | median)
    row=$(awk -v o="$o" -v t="$three" 'BEGIN {printf "%.1f | %.2f | %s", o * 1e6, o / t, (o < t) ? "yes" : "no"}')
    [[ "$row" == *"| yes" ]] && met=$((met + 1))
    echo "| $s | $row |"
done
echo
echo "within target: $met of ${#samplers[@]}"

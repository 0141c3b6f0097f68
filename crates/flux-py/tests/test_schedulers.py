"""sigmas() against ComfyUI's schedules: every entry of the schedulers manifest, compared as
float32 bit patterns with the same ulp allowances as the Rust parity checker."""

import numpy as np
import pytest

import flux_kernels as fk
from conftest import SafeTensors, manifest_cases, reference_dir

CASES = manifest_cases("schedulers")
# Samplers for which ComfyUI's KSampler drops the penultimate sigma.
DISCARD = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def model_of(case):
    ms = case["model_sampling"]
    kind = ms.get("type", "")
    if kind.startswith("ModelSamplingFlux"):
        assert ms.get("timesteps", 10000) == 10000, ms
        return "flux-dev", float(ms["shift"])
    if kind.startswith("ModelSamplingDiscrete"):
        assert ms.get("beta_schedule", "linear") == "linear", ms
        assert ms.get("linear_start", 0.00085) == 0.00085, ms
        assert ms.get("linear_end", 0.012) == 0.012, ms
        assert ms.get("timesteps", 1000) == 1000, ms
        return "sd15", None
    raise AssertionError(f"unsupported model_sampling type {kind!r}")


def allowed_ulps(scheduler, model):
    if scheduler in ("karras", "exponential", "kl_optimal"):
        return 2
    if scheduler in ("normal", "sgm_uniform") and model == "sd15":
        return 2
    return 0


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def ordered(x):
        bits = x.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, np.int64(-(2**31)) - bits, bits)

    return np.abs(ordered(a) - ordered(b))


def entries():
    out = []
    for case in CASES:
        for e in case["entries"]:
            out.append(pytest.param(case, e, id=f"{case.get('model', case['file'])}/{e['tensor']}"))
    return out


def test_manifest_lists_cases():
    assert CASES, f"no scheduler cases under {reference_dir() / 'schedulers'}"
    assert sum(len(c["entries"]) for c in CASES) > 0


@pytest.mark.parametrize("case,entry", entries())
def test_schedule_matches_reference(case, entry):
    model, shift = model_of(case)
    golden = SafeTensors(reference_dir() / "schedulers" / case["file"])
    reference = golden[entry["tensor"]].astype(np.float32)
    sampler = entry.get("sampler")
    discard = entry.get("discard_penultimate", sampler in DISCARD)
    if sampler is not None and (sampler in DISCARD) != discard:
        # The manifest's flag wins; any sampler with the same KSampler behaviour will do.
        sampler = "dpm_2" if discard else "euler"
    if sampler is None and discard:
        sampler = "dpm_2"
    actual = fk.sigmas(
        entry["scheduler"],
        entry["steps"],
        denoise=entry.get("denoise", 1.0),
        model=model,
        shift=shift,
        sampler=sampler,
    )
    assert actual.dtype == np.float64
    assert actual.shape == reference.shape, (actual, reference)
    as32 = actual.astype(np.float32)
    # The float64 values are float32 numbers, widened exactly.
    np.testing.assert_array_equal(as32.astype(np.float64), actual)
    nan_a, nan_r = np.isnan(as32), np.isnan(reference)
    np.testing.assert_array_equal(nan_a, nan_r)
    ok = ~nan_r
    ulps = ulp_distance(as32[ok], reference[ok])
    allowed = allowed_ulps(entry["scheduler"], model)
    assert ulps.max(initial=0) <= allowed, (
        f"{entry['tensor']}: up to {ulps.max()} ulps, {allowed} allowed\n"
        f"ours {as32}\nreference {reference}"
    )


def test_model_sampling_table_endpoints():
    # The flux-dev schedule starts at sigma_max = 1 and ends in 0.
    s = fk.sigmas("simple", 4)
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 5
    assert np.all(np.diff(s) < 0)

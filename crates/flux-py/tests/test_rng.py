"""randn and Generator against torch's CPU randn, bit for bit: every case of the rng manifest
(torch's own outputs, stored in the reference data; torch is not needed here)."""

import numpy as np
import pytest

import flux_kernels as fk
from conftest import SafeTensors, manifest_cases, read_manifest, reference_dir

CASES = manifest_cases("rng")


def golden():
    folder = reference_dir() / "rng"
    return SafeTensors(folder / read_manifest(folder).get("file", "rng.safetensors"))


def test_manifest_lists_cases():
    assert CASES, f"no rng cases under {reference_dir() / 'rng'}"
    assert any(c["kind"] == "prepare_noise" for c in CASES)
    assert any(c["kind"] == "default_noise_sampler" for c in CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c["tensor"]) for c in CASES])
def test_randn_matches_torch(case):
    dtype = {"f32": np.float32, "f64": np.float64}[case["dtype"]]
    reference = golden()[case["tensor"]]
    assert list(reference.shape) == case["shape"]
    if case["kind"] == "prepare_noise":
        actual = fk.randn(case["shape"], case["seed"], dtype)
    elif case["kind"] == "default_noise_sampler":
        # Draw `draw` of a generator seeded generator_seed (ComfyUI: seed + 1).
        g = fk.Generator(case.get("generator_seed", case["seed"] + 1))
        for _ in range(case.get("draw", 0) + 1):
            actual = g.randn(case["shape"], dtype=case["dtype"].replace("f", "float"))
    else:
        pytest.fail(f"unknown rng case kind {case['kind']!r}")
    assert actual.dtype == dtype
    assert actual.shape == tuple(case["shape"])
    # Bit for bit: compare the raw representations.
    np.testing.assert_array_equal(actual.view(np.uint8), reference.astype(dtype).view(np.uint8))


def test_seed_uses_low_32_bits_and_dtypes():
    a = fk.randn([20], 5, "float64")
    b = fk.randn((20,), 2**32 + 5, np.float64)
    np.testing.assert_array_equal(a, b)
    assert fk.randn(3, 0).dtype == np.float32
    assert fk.randn([], 0).shape == ()
    assert fk.randn([2, 0], 0).shape == (2, 0)

"""Bad input gets a clean Python exception (ValueError with the Rust message), never a crash;
exceptions raised by Python callables propagate with their traceback."""

import traceback

import numpy as np
import pytest

import flux_kernels as fk

X = np.zeros((1, 16, 2, 2), dtype=np.float32)
SIGMAS = fk.sigmas("simple", 3)


def identity(x, sigma):
    return np.zeros_like(x)


class DenoiserFailed(Exception):
    pass


def test_names():
    assert "euler" in fk.samplers() and "dpmpp_2m_sde" in fk.samplers()
    assert len(fk.samplers()) >= 26
    assert fk.samplers()[0] == "euler"
    assert set(fk.schedulers()) >= {"simple", "normal", "karras", "beta", "sgm_uniform"}
    assert fk.models() == ["flux-dev", "flux-schnell", "sd15"]


def test_denoiser_exception_propagates_with_traceback():
    calls = []

    def bad(x, sigma):
        calls.append(sigma)
        if len(calls) == 2:
            raise DenoiserFailed(f"boom at {sigma}")
        return x * 0.5

    with pytest.raises(DenoiserFailed, match="boom at") as info:
        fk.sample("euler", bad, X, SIGMAS)
    assert len(calls) == 2
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "bad" for f in frames), frames


def test_callback_and_noise_exceptions_propagate():
    def cb(step, total, x, denoised):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        fk.sample("euler", identity, X, SIGMAS, callback=cb)

    def noise(sigma, sigma_next):
        raise ZeroDivisionError("no noise")

    with pytest.raises(ZeroDivisionError, match="no noise"):
        fk.sample("euler_ancestral", identity, X, SIGMAS, noise=noise)


def test_callback_sees_every_step():
    seen = []
    fk.sample("euler", identity, X, SIGMAS, callback=lambda s, t, x, d: seen.append((s, t, x.shape, d.dtype)))
    assert seen == [(i, 3, X.shape, np.float32) for i in range(3)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sampler": "eulerr"}, "unknown sampler 'eulerr'"),
        ({"model": "sdxl"}, "unknown model 'sdxl'"),
        ({"x": np.zeros((1, 4), dtype=np.int64)}, "x: expected a float32 or float64 array, got dtype int64"),
        ({"x": np.zeros((0, 4), dtype=np.float32)}, "x: expected a non-empty array"),
        ({"sigmas": [[1.0, 0.0]]}, "sigmas: expected a one-dimensional array"),
        ({"sigmas": [1.0, float("nan"), 0.0]}, r"sigmas\[1\] is NaN"),
        ({"sigmas": ["a", "b"]}, "sigmas"),
        ({"options": {"etaa": 1.0}}, "unknown sampler option 'etaa'"),
        ({"options": {"eta": "much"}}, r"options\['eta'\]: expected a number"),
        ({"denoiser": 3}, "denoiser: expected a callable"),
        ({"seed": -1}, "seed: expected an integer"),
        ({"seed": 1, "noise": lambda s, t: None}, "either seed or noise"),
        ({"callback": "no"}, "callback: expected a callable"),
        ({"shift": 2.0, "model": "sd15"}, "invalid shift"),
    ],
)
def test_bad_sample_arguments(kwargs, match):
    args = {"sampler": "euler", "denoiser": identity, "x": X, "sigmas": SIGMAS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fk.sample(**args)


@pytest.mark.parametrize(
    "denoiser,match",
    [
        (lambda x, s: np.zeros((1, 16, 2, 3), dtype=np.float32), r"denoiser output: expected shape \[1, 16, 2, 2\], got \[1, 16, 2, 3\]"),
        (lambda x, s: np.zeros(x.shape, dtype=np.int32), "denoiser output: expected a float32 or float64 array, got dtype int32"),
        (lambda x, s: (x, x, x), "tuple of 3 items"),
        (lambda x, s: "text", "denoiser output"),
    ],
)
def test_bad_denoiser_outputs(denoiser, match):
    with pytest.raises(ValueError, match=match):
        fk.sample("euler", denoiser, X, SIGMAS)


def test_cfg_pp_needs_uncond():
    with pytest.raises(ValueError, match="needs the unconditional prediction"):
        fk.sample("euler_cfg_pp", identity, X, SIGMAS)
    out = fk.sample("euler_cfg_pp", lambda x, s: (x * 0, x * 0), X, SIGMAS)
    assert out.shape == X.shape


def test_bad_noise_output():
    with pytest.raises(ValueError, match=r"noise output: expected shape"):
        fk.sample("euler_ancestral", identity, X, SIGMAS, noise=lambda s, t: np.zeros(3))


def test_float64_and_other_array_likes():
    x64 = np.ones((2, 3), dtype=np.float64)
    out = fk.sample("euler", lambda x, s: x.tolist(), x64, [1.0, 0.5, 0.0])
    assert out.dtype == np.float64
    # A Fortran-ordered or strided input is read in logical order.
    xf = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    out = fk.sample("euler", lambda x, s: x, xf, [1.0, 0.0])
    np.testing.assert_array_equal(out, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_bad_sigmas_and_randn_arguments():
    with pytest.raises(ValueError, match="unknown scheduler 'simpel'"):
        fk.sigmas("simpel", 4)
    with pytest.raises(ValueError, match="steps: expected a non-negative integer"):
        fk.sigmas("simple", -1)
    with pytest.raises(ValueError, match="unknown sampler"):
        fk.sigmas("simple", 4, sampler="nope")
    with pytest.raises(ValueError, match="invalid denoise"):
        fk.sigmas("simple", 4, denoise=float("nan"))
    with pytest.raises(ValueError, match="dtype: expected float32 or float64, got int64"):
        fk.randn([2], 0, "int64")
    with pytest.raises(ValueError, match="dtype: expected float32 or float64"):
        fk.randn([2], 0, "not-a-dtype")
    with pytest.raises(ValueError, match="shape: dimensions must be non-negative"):
        fk.randn([-2], 0)
    with pytest.raises(ValueError, match="more than"):
        fk.randn([1 << 20, 1 << 20], 0)
    with pytest.raises(ValueError, match="seed"):
        fk.randn([2], 2**64)
    with pytest.raises(ValueError, match="seed"):
        fk.Generator("x")


def test_sampler_runs_with_seeded_noise_deterministically():
    def half(x, sigma):
        return x * 0.5

    a = fk.sample("euler_ancestral", half, X + 1, SIGMAS, seed=7)
    b = fk.sample("euler_ancestral", half, X + 1, SIGMAS, seed=7)
    c = fk.sample("euler_ancestral", half, X + 1, SIGMAS, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


class ArrayLike:
    """An object with only the array protocol, as CPU torch tensors offer it."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


def test_array_protocol_inputs_and_outputs():
    # Euler by hand with D(x) = x/2 on sigmas 1, 0.5, 0: x = 1 -> 0.75 -> 0.375.
    out = fk.sample(
        "euler",
        lambda x, s: ArrayLike(x * 0.5),
        ArrayLike(np.ones((2, 2), dtype=np.float32)),
        [1.0, 0.5, 0.0],
    )
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.full((2, 2), 0.375, dtype=np.float32))

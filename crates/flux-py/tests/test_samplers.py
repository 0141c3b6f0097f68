"""Every sampler against ComfyUI's reference runs: each case the samplers manifest lists is
replayed through flux_kernels.sample with the analytic toy denoiser written here in numpy.

Checks and tolerances are those of the Rust parity checker (crates/flux-parity/src/samplers.rs):
- f64 cases: the denoiser evaluates the exact posterior mean of the case's mixtures (with its
  cfg); every call's x and sigma, the denoiser output, the number of calls and the result are
  compared at relative 1e-10 (absolute 1e-12), sigmas at relative 1e-12. deis and dpm_fast,
  whose reference coefficients are float32, replay the recorded model outputs and compare at
  relative 1e-6 of the tensor's largest magnitude.
- f32 cases: replay of the recorded model outputs on a float32 latent, relative 1e-5 of the
  tensor's largest magnitude (5e-5 for uni_pc's output).
- Noise: the recorded draws are replayed in order through a Python noise callable that checks
  the (sigma, sigma_next) each was requested for; draws from torch's global RNG (NaN sigmas)
  are not made by these samplers and are dropped.
"""

import math

import numpy as np
import pytest

import flux_kernels as fk
from conftest import SafeTensors, manifest_cases, reference_dir

CASES = manifest_cases("samplers")
CFG_PP = {
    "euler_cfg_pp",
    "euler_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation_cfg_pp",
}
UNI_PC = {"uni_pc", "uni_pc_bh2"}
F32_COEFFICIENTS = {"deis", "dpm_fast"}
PASSTHROUGH = {
    "eta", "s_noise", "s_churn", "s_tmin", "s_tmax", "r", "r_1", "r_2", "ge_gamma", "rtol",
    "atol", "h_init", "pcoeff", "icoeff", "dcoeff", "accept_safety", "noise_clip_std",
    "s_noise_end", "max_order", "max_stage", "predictor_order", "corrector_order",
    "simple_order_2", "solver_type", "deis_mode",
}


def number(v):
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return v


def sampler_options(sampler, extra):
    """The manifest's extra_options as sample() options; fixed options must have the value
    the sampler's name implies."""
    options = {}
    uni_pc = sampler in UNI_PC
    fixed = {
        "use_pece": sampler == "sa_solver_pece",
        "cfg_pp": sampler in CFG_PP,
        "tau_func": None,
        "noise_scaler": None,
    }
    if uni_pc:
        fixed.update(
            variant="bh1" if sampler == "uni_pc" else "bh2",
            last_sigma_replaced_by=0.001,
            lower_order_final=True,
            predict_x0=True,
            thresholding=False,
            method="multistep",
            model_type="noise",
            order="min(3, len(sigmas) - 2)",
        )
    for k, v in extra.items():
        if k in fixed:
            assert v == fixed[k], f"extra_options.{k} = {v!r}: only {fixed[k]!r} is supported"
        elif k == "order":
            options["order"] = v
        elif k in PASSTHROUGH:
            options[k] = number(v)
        else:
            raise AssertionError(f"extra_options.{k} = {v!r}: option not supported")
    return options


def model_of(case):
    ms = case["model_sampling"]
    kind = ms.get("type", "")
    if kind.startswith("ModelSamplingFlux"):
        return "flux-dev", float(ms["shift"]), True
    if kind.startswith("ModelSamplingDiscrete"):
        assert ms.get("beta_schedule") == "linear" and ms.get("linear_start") == 0.00085
        assert ms.get("linear_end") == 0.012 and ms.get("timesteps") == 1000
        return "sd15", None, False
    raise AssertionError(f"unknown model_sampling type {kind!r}")


def posterior_mean(mix, x, a, sigma):
    """E[x0 | a x0 + sigma eps = x] for x0 ~ sum_k w_k N(mu_k, s_k^2), elementwise."""
    w = np.asarray(mix["w"], dtype=np.float64)
    mu = np.asarray(mix["mu"], dtype=np.float64)
    s2 = np.asarray(mix["s"], dtype=np.float64) ** 2
    xs = x[..., None]
    v = a * a * s2 + sigma * sigma
    r = xs - a * mu
    logits = np.log(w) - 0.5 * np.log(v) - 0.5 * r * r / v
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    means = mu + a * s2 * r / v
    return (e * means).sum(axis=-1) / e.sum(axis=-1)


class Stats:
    """Collects the first tolerance violation, like the Rust ErrorStats."""

    def __init__(self):
        self.failures = []

    def compare(self, what, actual, reference, rel, abs_tol, scaled=False):
        actual = np.asarray(actual, dtype=np.float64).ravel()
        reference = np.asarray(reference, dtype=np.float64).ravel()
        if actual.shape != reference.shape:
            self.failures.append(f"{what}: {actual.size} values, reference has {reference.size}")
            return
        if scaled:
            abs_tol = max(abs_tol, rel * float(np.abs(reference).max(initial=0.0)))
        d = np.abs(actual - reference)
        bad = ~(d <= abs_tol + rel * np.abs(reference))
        if bad.any():
            i = int(np.argmax(bad))
            self.failures.append(f"{what}[{i}]: {actual[i]!r} vs reference {reference[i]!r}")


class CheckedDenoiser:
    """Checks every call against call.NNN.* and returns the analytic or recorded output."""

    def __init__(self, golden, case, analytic, flow, x_tol, sigma_rel, stats, cfg_pp):
        self.golden = golden
        self.case = case
        self.analytic = analytic
        self.flow = flow
        self.x_tol = x_tol
        self.sigma_rel = sigma_rel
        self.stats = stats
        self.cfg_pp = cfg_pp
        self.calls = 0

    def __call__(self, x, sigma):
        i = self.calls
        self.calls += 1
        p = f"call.{i:03d}"
        assert f"{p}.x" in self.golden, f"model call {i}: the reference made only {i} calls"
        assert isinstance(sigma, float)
        rs = self.golden[f"{p}.sigma"]
        self.stats.compare(f"{p}.sigma", np.full(rs.shape, sigma), rs, self.sigma_rel, 0.0)
        self.stats.compare(f"{p}.x", x, self.golden[f"{p}.x"], *self.x_tol)
        if self.analytic:
            a = 1.0 - sigma if self.flow else 1.0
            cfg = float(self.case["cfg"])
            cond = posterior_mean(self.case["mix_cond"], x, a, sigma)
            if cfg == 1.0 and not self.cfg_pp:
                denoised, uncond = cond, None
            else:
                uncond = posterior_mean(self.case["mix_uncond"], x, a, sigma)
                denoised = uncond + (cond - uncond) * cfg
            self.stats.compare(f"{p}.denoised", denoised, self.golden[f"{p}.denoised"], *self.x_tol)
            if uncond is not None and f"{p}.uncond_denoised" in self.golden:
                self.stats.compare(
                    f"{p}.uncond_denoised", uncond, self.golden[f"{p}.uncond_denoised"], *self.x_tol
                )
        else:
            denoised = self.golden[f"{p}.denoised"].astype(x.dtype)
            uncond = (
                self.golden[f"{p}.uncond_denoised"].astype(x.dtype) if self.cfg_pp else None
            )
        if self.cfg_pp:
            return denoised, uncond
        return denoised


class ReplayNoise:
    """Returns the recorded noise draws in order, checking the sigmas they were drawn for."""

    def __init__(self, draws, rel, dtype):
        self.draws = draws
        self.rel = rel
        self.dtype = dtype
        self.used = 0

    def matches(self, recorded, requested):
        return recorded == requested or abs(recorded - requested) <= self.rel * max(
            abs(recorded), abs(requested)
        )

    def __call__(self, sigma, sigma_next):
        i = self.used
        assert i < len(self.draws), f"noise draw {i} for {sigma} -> {sigma_next}: only {len(self.draws)} recorded"
        values, (s0, s1) = self.draws[i]
        assert self.matches(s0, sigma) and self.matches(s1, sigma_next), (
            f"draw {i}: requested for {sigma!r} -> {sigma_next!r}, recorded for {s0!r} -> {s1!r}"
        )
        self.used += 1
        return values.astype(self.dtype)


def recorded_draws(golden):
    draws = []
    i = 0
    while f"noise.{i:03d}" in golden:
        s = golden[f"noise_sigma.{i:03d}"].astype(np.float64).ravel()
        assert s.size == 2
        draws.append((golden[f"noise.{i:03d}"], (float(s[0]), float(s[1]))))
        i += 1
    return draws


def run_case(case, inverse_noise_scaling):
    sampler = case["sampler"]
    golden = SafeTensors(reference_dir() / "samplers" / case["file"])
    f32 = case.get("dtype", "f64") == "f32"
    assert case.get("dtype", "f64") in ("f32", "f64")
    dtype = np.float32 if f32 else np.float64
    sigmas = golden["sigmas_f32" if f32 else "sigmas"].astype(np.float64)
    model, shift, flow = model_of(case)
    options = sampler_options(sampler, case.get("extra_options") or {})
    x_init = golden["x_init"].astype(dtype)

    draws = recorded_draws(golden)
    assert case["n_noise_draws"] == len(draws)
    own = [d for d in draws if not (math.isnan(d[1][0]) and math.isnan(d[1][1]))]
    noise = ReplayNoise(own, 1e-6 if (f32 or sampler == "dpm_fast") else 1e-12, dtype)

    f32_coefficients = sampler in F32_COEFFICIENTS
    if f32:
        x_tol = (1e-5, 0.0, True)
        out_tol = (5e-5 if sampler in UNI_PC else 1e-5, 0.0, True)
    else:
        rel = 1e-6 if f32_coefficients else 1e-10
        x_tol = out_tol = (rel, 1e-12, rel > 1e-10)
    stats = Stats()
    den = CheckedDenoiser(
        golden,
        case,
        analytic=not (f32 or f32_coefficients),
        flow=flow,
        x_tol=x_tol,
        sigma_rel=1e-6 if (f32 or sampler == "dpm_fast") else 1e-12,
        stats=stats,
        cfg_pp=sampler in CFG_PP,
    )
    out = fk.sample(
        sampler,
        den,
        x_init,
        sigmas,
        model=model,
        shift=shift,
        noise=noise,
        options=options,
        inverse_noise_scaling=inverse_noise_scaling,
    )
    assert out.dtype == dtype and out.shape == x_init.shape
    assert den.calls == case["n_model_calls"], f"{den.calls} model calls, reference {case['n_model_calls']}"
    assert noise.used == len(own), f"{noise.used} noise draws, reference {len(own)}"
    return out, golden, stats, out_tol


def case_params():
    return [pytest.param(c, id=c.get("name", c["file"])) for c in CASES]


def test_manifest_lists_cases():
    assert CASES, f"no sampler cases under {reference_dir() / 'samplers'}"


def test_every_sampler_is_covered():
    covered = {c["sampler"] for c in CASES}
    missing = [s for s in fk.samplers() if s not in covered and not s.endswith("_gpu")]
    # The _gpu twins run the same update as their base sampler; the public data covers them too.
    assert not missing, f"samplers without a reference case: {missing}"


@pytest.mark.parametrize("case", case_params())
def test_sampler_matches_reference(case):
    out, golden, stats, out_tol = run_case(case, inverse_noise_scaling=True)
    stats.compare("out", out, golden["out"], *out_tol)
    assert not stats.failures, f"{case['name']}: {stats.failures[0]} ({len(stats.failures)} violations)"


@pytest.mark.parametrize("case", case_params())
def test_sampler_raw_output_matches_reference(case):
    # Without inverse_noise_scaling the sampler's own return value (out_raw) comes back.
    out, golden, stats, out_tol = run_case(case, inverse_noise_scaling=False)
    stats.compare("out_raw", out, golden["out_raw"], *out_tol)
    assert not stats.failures, f"{case['name']}: {stats.failures[0]} ({len(stats.failures)} violations)"

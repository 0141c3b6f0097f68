"""Flux.1 sampling kernels from Python.

Every ComfyUI sampler and scheduler implemented in Rust, noise identical to PyTorch's CPU
``randn``, and the img2img pipeline. The GIL is released while Rust works.
"""

from os import PathLike
from typing import Any, Callable, Literal, Mapping, Sequence, TypedDict, Union

import numpy as np
import numpy.typing as npt

__version__: str

FloatArray = npt.NDArray[np.floating[Any]]
DTypeLike = Union[str, type, np.dtype[Any], None]
ImageInput = Union[str, bytes, bytearray, "PathLike[str]", Any]

def samplers() -> list[str]:
    """Every sampler name, in ComfyUI's order (the hosted API's 26 first)."""

def schedulers() -> list[str]:
    """Every scheduler name (normal, karras, exponential, sgm_uniform, simple, ...)."""

def models() -> list[str]:
    """The model names ``sigmas`` and ``sample`` accept: flux-dev, flux-schnell, sd15."""

def sigmas(
    scheduler: str,
    steps: int,
    denoise: float = 1.0,
    model: str = "flux-dev",
    shift: float | None = None,
    sampler: str | None = None,
) -> npt.NDArray[np.float64]:
    """The sigma schedule ComfyUI's KSampler runs.

    ``denoise < 1`` computes ``int(steps / denoise)`` steps and keeps the last ``steps + 1``
    sigmas; ``sampler`` (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2) drops the penultimate
    sigma as ComfyUI does for those samplers. ``shift`` overrides a Flux model's time shift.
    The values are ComfyUI's float32 numbers, widened to float64.

    Raises ValueError for an unknown scheduler, model or sampler, or a bad steps/denoise/shift.
    """

def sample(
    sampler: str,
    denoiser: Callable[[FloatArray, float], Union[FloatArray, tuple[FloatArray, FloatArray]]],
    x: FloatArray,
    sigmas: Union[FloatArray, Sequence[float]],
    model: str = "flux-dev",
    seed: int | None = None,
    noise: Callable[[float, float], FloatArray] | None = None,
    options: Mapping[str, Any] | None = None,
    callback: Callable[[int, int, FloatArray, FloatArray], Any] | None = None,
    shift: float | None = None,
    inverse_noise_scaling: bool = True,
) -> FloatArray:
    """Runs ``sampler`` from ``x`` along ``sigmas`` and returns the result.

    ``x`` is the sampler input, already noise-scaled (float32 or float64; the result has the
    same dtype and shape). ``denoiser(x, sigma)`` returns the denoised prediction as an array of
    x's shape (numpy arrays, or anything with the array protocol such as CPU torch tensors);
    CFG++ samplers (``*_cfg_pp``) need ``(denoised, uncond_denoised)`` instead. ``model`` picks
    the model sampling (flow models take the rectified-flow branch of some samplers).

    Noise: by default ComfyUI's own noise for ``seed`` (0 when not given): a Brownian tree for
    the SDE samplers, otherwise a torch generator seeded ``seed + 1``. Or ``noise(sigma,
    sigma_next)`` returning a standard-normal array of x's shape.

    ``options``: sampler keyword options (eta, s_noise, s_churn, s_tmin, s_tmax, r, order,
    solver_type, max_order, deis_mode, rtol, atol, h_init, pcoeff, icoeff, dcoeff,
    accept_safety, s_noise_end, noise_clip_std, r_1, r_2, ge_gamma, max_stage, predictor_order,
    corrector_order, simple_order_2); None keeps the sampler's default.

    ``callback(step, total, x, denoised)`` is called after every step. With
    ``inverse_noise_scaling`` the output is scaled as ComfyUI's KSAMPLER does (flow models
    divide by ``1 - last_sigma``); otherwise the sampler's raw output is returned.

    An exception raised by the denoiser, noise or callback stops sampling and propagates with
    its traceback. Raises ValueError for bad names, shapes, dtypes or options.
    """

def randn(
    shape: Union[int, Sequence[int]], seed: int, dtype: DTypeLike = None
) -> FloatArray:
    """``torch.randn(shape, generator=torch.manual_seed(seed), dtype=dtype)``, bit for bit.

    ``dtype`` is float32 (default) or float64.
    """

class Generator:
    """A torch-compatible CPU generator: successive draws continue one stream."""

    def __init__(self, seed: int) -> None: ...
    def randn(self, shape: Union[int, Sequence[int]], dtype: DTypeLike = None) -> FloatArray:
        """The next ``randn(shape, dtype=dtype)`` draw (float32 by default)."""

class Pipeline:
    """Models loaded once; any number of ``img2img`` calls reuse them.

    With ``model_dir=None`` the built-in demo model (random weights) is used. A ComfyUI-style
    models folder needs the T5 and CLIP ``tokenizer.json`` files too.
    """

    def __init__(
        self,
        model_dir: str | PathLike[str] | None = None,
        backend: Literal["cpu"] = "cpu",
        t5_tokenizer: str | PathLike[str] | None = None,
        clip_tokenizer: str | PathLike[str] | None = None,
    ) -> None: ...
    @property
    def is_demo(self) -> bool:
        """Whether this is the built-in demo model."""

    def img2img(
        self,
        image: ImageInput,
        prompt: str,
        steps: int = 20,
        seed: int | None = 46588,
        denoise: float = 0.75,
        scheduler: str = "simple",
        sampler_name: str = "euler",
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        max_megapixels: float | None = None,
        image_format: Literal["png", "jpeg", "webp"] = "png",
        output: Literal["pil", "bytes"] = "pil",
        callback: Callable[[int, int], Any] | None = None,
    ) -> Any:
        """One img2img run: a PIL image (``output="pil"``, needs Pillow) or encoded bytes.

        ``image``: a path, URL, data URI, base64 string, encoded bytes or a PIL image. Sides are
        rounded to multiples of 16 (``width``/``height`` fit it into a box first,
        ``max_megapixels`` caps its size). ``callback(step, total)`` runs after every step.
        Raises ValueError for bad parameters or an unreadable image.
        """

class _Metrics(TypedDict):
    inference_time: float
    sampling_time: float

class RunResult(TypedDict):
    status: str
    output: Union[str, bytes]
    metrics: _Metrics
    metadata: dict[str, Any]

def run(model: Literal["flux-img2img"], /, pipeline: Pipeline | None = None, **params: Any) -> RunResult:
    """Runs a job like the hosted API's client, with its parameter names and result shape.

    Parameters: image (required), prompt (required), steps (1..50, default 20), seed (default
    46588), denoise (0..1, default 0.75), scheduler (default "simple"), sampler_name (one of the
    API's 26 samplers, default "euler"), base64 (default False), image_format ("png", "jpeg"
    (default) or "webp"). Returns ``{"status": "COMPLETED", "output": base64 str or bytes,
    "metrics": {"inference_time": seconds, ...}, "metadata": {...}}``. Uses the built-in demo
    model unless ``pipeline`` is given. Raises ValueError for bad parameters.
    """

"""Pipeline and run() with the built-in demo model (small, random weights)."""

import base64
import io

import numpy as np
import pytest

import flux_kernels as fk

PIL = pytest.importorskip("PIL.Image")


def png_bytes(width, height):
    rng = np.random.default_rng(3)
    img = PIL.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


@pytest.fixture(scope="module")
def pipe():
    p = fk.Pipeline()
    assert p.is_demo
    return p


def test_img2img_returns_image_of_input_size(pipe):
    img, _ = png_bytes(48, 32)
    steps = []
    out = pipe.img2img(img, "a red fox", steps=2, seed=1, callback=lambda s, t: steps.append((s, t)))
    assert isinstance(out, PIL.Image)
    assert out.size == (48, 32)
    assert out.mode == "RGB"
    assert steps and steps[-1][0] == steps[-1][1]


def test_img2img_rounds_to_multiple_of_16_and_returns_bytes(pipe, tmp_path):
    _, data = png_bytes(36, 20)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    out = pipe.img2img(str(path), "x", steps=1, output="bytes", image_format="jpeg")
    assert isinstance(out, bytes) and out[:2] == b"\xff\xd8"
    assert PIL.open(io.BytesIO(out)).size == (32, 16)
    same = pipe.img2img(path, "x", steps=1, output="bytes", image_format="jpeg")
    assert same == out  # deterministic for a seed, whichever way the image is given


def test_img2img_denoise_zero_returns_input(pipe):
    img, data = png_bytes(32, 16)
    out = pipe.img2img(data, "x", denoise=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_img2img_bad_parameters(pipe):
    img, _ = png_bytes(32, 16)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.img2img(img, "x", sampler_name="nope")
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe.img2img(img, "x", scheduler="nope")
    with pytest.raises(ValueError, match="steps"):
        pipe.img2img(img, "x", steps=0)
    with pytest.raises(ValueError, match="denoise"):
        pipe.img2img(img, "x", denoise=1.5)
    with pytest.raises(ValueError, match="image_format"):
        pipe.img2img(img, "x", image_format="gif")
    with pytest.raises(ValueError, match="output"):
        pipe.img2img(img, "x", output="array")
    with pytest.raises(ValueError, match="image"):
        pipe.img2img(12, "x")
    with pytest.raises(ValueError):
        pipe.img2img(b"not an image at all", "x")
    with pytest.raises(ValueError):
        pipe.img2img("/nonexistent/file.png", "x")
    with pytest.raises(ValueError, match="backend"):
        fk.Pipeline(backend="vulkan")
    with pytest.raises(ValueError, match="tokenizer"):
        fk.Pipeline(model_dir="somewhere")


def test_img2img_callback_exception_propagates(pipe):
    img, _ = png_bytes(32, 16)

    def cb(step, total):
        raise RuntimeError("user stop")

    with pytest.raises(RuntimeError, match="user stop"):
        pipe.img2img(img, "x", steps=2, callback=cb)


def test_run_has_hosted_result_shape():
    _, data = png_bytes(32, 32)
    result = fk.run(
        "flux-img2img",
        image=base64.b64encode(data).decode(),
        prompt="a cat",
        steps=2,
        seed=46588,
        denoise=0.75,
        scheduler="simple",
        sampler_name="euler",
        base64=True,
        image_format="png",
    )
    assert result["status"] == "COMPLETED"
    assert isinstance(result["metrics"]["inference_time"], float)
    assert result["metrics"]["inference_time"] > 0
    out = PIL.open(io.BytesIO(base64.b64decode(result["output"])))
    assert out.size == (32, 32) and out.format == "PNG"
    raw = fk.run("flux-img2img", image=data, prompt="a cat", steps=1)
    assert isinstance(raw["output"], bytes) and raw["output"][:2] == b"\xff\xd8"  # jpeg default


@pytest.mark.parametrize(
    "params,match",
    [
        ({"image": None, "prompt": "p"}, "image: required"),
        ({"prompt": None}, "prompt: required"),
        ({"prompt": "  "}, "prompt: must not be empty"),
        ({"steps": 51}, "steps: expected an integer from 1 to 50"),
        ({"steps": 0}, "steps: expected an integer from 1 to 50"),
        ({"denoise": -0.1}, "denoise"),
        ({"sampler_name": "seeds_2"}, "not one of the API's samplers"),
        ({"scheduler": "fast"}, "scheduler"),
        ({"image_format": "bmp"}, "image_format"),
        ({"base64": "yes"}, "base64"),
        ({"guidance": 3.0}, "unknown parameter 'guidance'"),
    ],
)
def test_run_bad_parameters(params, match):
    _, data = png_bytes(16, 16)
    full = {"image": data, "prompt": "p"}
    full.update(params)
    full = {k: v for k, v in full.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        fk.run("flux-img2img", **full)


def test_run_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'flux-txt2img'"):
        fk.run("flux-txt2img", prompt="p")

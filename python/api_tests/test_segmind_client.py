"""The official `segmind` client against `flux serve`, changing only its base URL."""

import httpx
import pytest
from segmind import InferenceFailed, SegmindClient, SegmindError

from conftest import API_KEY

MODEL = "flux-img2img"


@pytest.fixture
def client(server):
    return SegmindClient(base_url=server + "/v1", api_key=API_KEY)


def test_run_returns_the_completed_result(client, small_image):
    result = client.run(MODEL, prompt="a red fox", image=small_image, steps=2)
    assert result["status"] == "COMPLETED"
    assert result["metrics"]["inference_time"] > 0
    assert result["metadata"]["demo"] is True
    image = httpx.get(result["output"], timeout=30)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content[:2] == b"\xff\xd8"


def test_submit_async_wait_with_base64_output(client, small_image):
    job = client.submit_async(MODEL, prompt="a red fox", image=small_image, steps=2, base64=True, image_format="png")
    assert job.submit_response["status"] == "QUEUED"
    assert job.status_url.endswith(f"/v2/requests/{job.request_id}/status")
    result = job.wait(timeout=120, interval=0.1)
    assert result["status"] == "COMPLETED"
    import base64

    assert base64.b64decode(result["output"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_sync_returns_image_bytes(client, small_image):
    response = client.run_sync(MODEL, prompt="a red fox", image=small_image, steps=2)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content[:2] == b"\xff\xd8"


def test_failing_job_raises_inference_failed(client, broken_image):
    job = client.submit_async(MODEL, prompt="a red fox", image=broken_image, steps=2)
    with pytest.raises(InferenceFailed) as info:
        job.wait(timeout=120, interval=0.1)
    assert "image" in (info.value.detail or "")
    assert info.value.status_body["status"] == "FAILED"


def test_invalid_parameter_is_a_400_naming_the_field(client, small_image):
    with pytest.raises(SegmindError) as info:
        client.run_sync(MODEL, prompt="a red fox", image=small_image, steps=0)
    assert info.value.status == 400
    assert "steps" in info.value.detail
    with pytest.raises(SegmindError) as info:
        client.submit_async(MODEL, prompt="a red fox", image=small_image, sampler_name="nope")
    assert info.value.status == 400
    assert "sampler_name" in info.value.detail


def test_bad_key_is_a_401(server, small_image):
    bad = SegmindClient(base_url=server + "/v1", api_key="wrong-key")
    with pytest.raises(SegmindError) as info:
        bad.run_sync(MODEL, prompt="a red fox", image=small_image, steps=2)
    assert info.value.status == 401


def test_unknown_model_is_a_404(client, small_image):
    with pytest.raises(SegmindError) as info:
        client.run_sync("no-such-model", prompt="a red fox", image=small_image)
    assert info.value.status == 404
    with pytest.raises(SegmindError) as info:
        client.submit_async("no-such-model", prompt="a red fox", image=small_image)
    assert info.value.status == 404

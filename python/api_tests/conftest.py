"""Starts `flux serve` (the built binary) on a free port with a temporary data dir."""

import base64
import os
import socket
import struct
import subprocess
import tempfile
import time
import zlib

import httpx
import pytest

API_KEY = "pytest-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flux_binary() -> str:
    path = os.environ.get("FLUX_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", "target")
        path = os.path.join(target, "debug", "flux")
    if not os.path.exists(path):
        pytest.fail(f"flux binary not found at {path}: build it (cargo build -p flux-cli) or set FLUX_BIN")
    return path


def png(width: int, height: int) -> bytes:
    """A small RGB PNG written by hand (no imaging library needed)."""
    raw = b"".join(
        b"\x00" + b"".join(bytes((x * 9 % 256, y * 5 % 256, 128)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def small_image() -> str:
    return base64.b64encode(png(16, 16)).decode()


@pytest.fixture(scope="session")
def broken_image() -> str:
    """A PNG whose header is intact but whose pixel data is cut off: it passes the request
    check and fails in the worker."""
    data = png(32, 32)
    idat = data.index(b"IDAT")
    return base64.b64encode(data[: idat + 20]).decode()


@pytest.fixture(scope="session")
def server():
    data_dir = tempfile.mkdtemp(prefix="flux-api-")
    port = _free_port()
    log = open(os.path.join(data_dir, "server.log"), "w")
    proc = subprocess.Popen(
        [_flux_binary(), "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data_dir, "--api-key", API_KEY],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flux serve exited with {proc.returncode}; log in {log.name}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("flux serve did not become healthy")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()

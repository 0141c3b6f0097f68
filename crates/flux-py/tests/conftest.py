"""Shared helpers of the flux_kernels tests: where the reference data is, and a reader for its
safetensors files (numpy only, so the tests need neither torch nor the safetensors package)."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "U8": "u1",
}


def reference_dir() -> Path:
    """`FLUX_REFERENCE_DIR` when set, else the repository's testdata folder."""
    env = os.environ.get("FLUX_REFERENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "testdata"


def read_manifest(folder: Path) -> dict:
    with open(folder / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def manifest_cases(sub: str) -> list:
    """The `cases` of `<reference>/<sub>/manifest.json` (empty when the folder is missing, which
    the tests that use it report as a failure)."""
    path = reference_dir() / sub / "manifest.json"
    if not path.is_file():
        return []
    return read_manifest(path.parent).get("cases", [])


class SafeTensors:
    """The tensors of one safetensors file, as numpy arrays (read on demand)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        (n,) = struct.unpack("<Q", self.data[:8])
        self.header = json.loads(self.data[8 : 8 + n])
        self.base = 8 + n

    def __contains__(self, name: str) -> bool:
        return name in self.header and name != "__metadata__"

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self:
            raise KeyError(f"{self.path.name} has no tensor {name}")
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = self.data[self.base + start : self.base + end]
        return np.frombuffer(raw, dtype=dtype).reshape(info["shape"])


@pytest.fixture(scope="session")
def refdir() -> Path:
    return reference_dir()

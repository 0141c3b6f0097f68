"""The README's Python example runs as written."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)
    assert len(section) == 2, "README has no '## Python' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert blocks, "the README's Python section has no python code block"
    return blocks[0]


def test_readme_example_runs(tmp_path):
    pytest.importorskip("PIL.Image")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    # Run it from a folder that holds the files it names, so nothing is written to the checkout.
    for rel in re.findall(r'"(testdata/[^"]+)"', code):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.png").stat().st_size > 0
    assert "(1, 16, 64, 64)" in run.stdout

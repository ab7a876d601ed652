"""The code is type-checked (mypy, the settings in pyproject.toml) and lint-clean (ruff)."""

import subprocess
import sys

import pytest

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.mark.parametrize(
    "command",
    [
        ["mypy"],  # the packages and settings come from [tool.mypy]
        ["ruff", "check", "jema", "interop", "tests"],
        ["ruff", "format", "--check", "jema", "interop", "tests"],
    ],
    ids=["mypy", "ruff-check", "ruff-format"],
)
def test_the_code_passes(command):
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The wheel and sdist build without a warning, hold the library only, and the wheel alone
(no torch) installs into a clean venv where jema and interop's safetensors paths work."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import jema

ROOT = Path(__file__).resolve().parent.parent

IN_THE_CLEAN_VENV = """
import os, subprocess, sys
import numpy as np, ml_dtypes
import jema, interop

assert jema.__version__ == {version!r}, jema.__version__
assert interop.__jema__ is True
net = {{"params": {{"fc": {{"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                          "bias": np.ones(3, ml_dtypes.bfloat16)}}}}}}
interop.save_checkpoint("ckpt.safetensors", net=net, ema_net=net)
back = interop.load_checkpoint("ckpt.safetensors", net)
for name in ("kernel", "bias"):
    got, want = np.asarray(back["params"]["fc"][name]), net["params"]["fc"][name]
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
assert "ema_net" in interop.inspect_checkpoint("ckpt.safetensors")
interop.save_checkpoint("ckpt.pth", net=net, epoch=3)  # .pth with numpy alone
read = interop.read_checkpoint("ckpt.pth")
assert read["epoch"] == 3 and read["net"]["fc.weight"].tobytes() == net["params"]["fc"][
    "kernel"].T.tobytes()
try:
    interop.flax_to_torch(net)
except ImportError as e:
    assert 'pip install "jema[torch]"' in str(e), e
else:
    raise AssertionError("flax_to_torch without torch did not ask for jema[torch]")
assert "torch" not in sys.modules
version = subprocess.run([os.path.join(os.path.dirname(sys.executable), "jema"), "--version"],
                         capture_output=True, text=True, check=True).stdout
assert version.splitlines()[0] == "jema " + jema.__version__, version
print("ok")
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    return out


def test_the_wheel_holds_jema_interop_their_markers_and_the_license(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    info = f"jema-{jema.__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {"jema", "interop", info}
    assert {"jema/py.typed", "interop/py.typed", f"{info}/licenses/LICENSE"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".ipynb")]


def test_the_sdist_holds_the_library_and_its_metadata_only(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    top = {n.split("/")[0] for n in names}
    assert top == {
        "jema",
        "interop",
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "PKG-INFO",
        ".gitignore",
    }


def test_the_wheel_alone_installs_into_a_clean_venv_without_torch(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    script = IN_THE_CLEAN_VENV.format(version=jema.__version__)
    result = subprocess.run(
        [python, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stdout + result.stderr


def test_the_test_extra_brings_jupyter_nbconvert_to_run_the_notebooks():
    requires = importlib.metadata.requires("jema") or []
    extra = [r for r in requires if r.replace('"', "'").endswith("extra == 'test'")]
    assert any(r.startswith("nbconvert") for r in extra), extra
    result = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip()[0].isdigit(), result.stderr

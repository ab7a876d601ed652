"""The ``jema`` command line's conventions: ``--version``, exit codes, one-line errors, and a
clear word when ``import interop`` finds PyPI's unrelated package of that name."""

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import subprocess
import sys

import pytest

import jema
from jema._app.cli import main
from tests.unprivileged import as_normal_user


def jema_cli(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "jema", *args]
    # run from that folder too: ``python -m`` puts the working directory first on sys.path
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=pythonpath, check=False
    )


def test_version_names_jema_its_stack_and_where_interop_comes_from():
    result = jema_cli("--version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"jema {jema.__version__}" == f"jema {importlib.metadata.version('jema')}"
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert f"{name} {importlib.metadata.version(name)}" in lines
    torch = importlib.util.find_spec("torch")
    assert (f"torch {importlib.metadata.version('torch')}" if torch else "torch not installed") in (
        lines
    )
    import interop

    assert lines[-1] == f"interop: jema's ({interop.__file__})"


HIDE_TORCH = """
import importlib.machinery, sys

class NoTorch(importlib.machinery.PathFinder):
    \"\"\"sys.path's finder, less torch: neither importable nor installed as metadata says.\"\"\"

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "torch" else super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        found = super().find_distributions(*args, **kwargs)
        return (d for d in found if d.metadata["Name"] != "torch")

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = NoTorch
try:
    import torch
except ImportError:
    print("import torch fails")
from jema._app.cli import main
sys.exit(main(["--version"]))
"""


def test_version_without_torch_says_torch_is_not_installed():
    command = [sys.executable, "-c", HIDE_TORCH]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "import torch fails" and lines[1] == f"jema {jema.__version__}"
    assert [line.split()[0] for line in lines[1:-1]] == [
        *("jema", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors"),
        "torch",
    ]
    assert lines[-2] == "torch not installed" and lines[-1].startswith("interop: jema's (")


@pytest.fixture
def foreign_interop(tmp_path):
    """A folder holding an ``interop`` package that is not jema's, like PyPI's Illumina one."""
    package = tmp_path / "interop"
    package.mkdir()
    (package / "__init__.py").write_text('"""Illumina InterOp stand-in."""\n')
    return str(tmp_path)


def test_a_foreign_interop_is_named_by_version_and_inspect(foreign_interop, tmp_path):
    version = jema_cli("--version", pythonpath=foreign_interop)
    assert version.returncode == 0
    assert "is not jema's interop (PyPI's unrelated 'interop' package" in version.stdout
    inspect = jema_cli("inspect", str(tmp_path / "x.pth"), pythonpath=foreign_interop)
    assert inspect.returncode == 1 and "Traceback" not in inspect.stderr
    assert inspect.stderr.count("\n") == 1
    assert "pip uninstall interop, then pip install --force-reinstall jema" in inspect.stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ((), 2, "jema: a command is required"),
        (("nope",), 2, "jema: argument command: invalid choice: 'nope'"),
        (
            ("demo", "--epochs", "x"),
            2,
            "jema demo: argument --epochs: must be a positive int; got 'x'",
        ),
        (("inspect", "no-such.pth"), 1, "jema inspect: "),
    ],
)
def test_exit_status_is_2_for_usage_and_1_for_failures_with_one_line(args, status, message):
    result = jema_cli(*args)
    assert result.returncode == status
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_cli_rejects_bad_settings_before_writing_anything(tmp_path):
    out = str(tmp_path / "not-yet")
    for args, message in (
        (["demo", "--decay", "1.5", "--out", out], "decay must be a number strictly inside (0, 1)"),
        (["demo", "--epochs", "0", "--out", out], "--epochs: must be a positive int; got '0'"),
        (["bench", "--repeats", "0"], "--repeats: must be a positive int; got '0'"),
    ):
        command = [sys.executable, "-m", "jema", *args]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "jema demo: argument --seed: must be a non-negative int; got '-1'"),
        (["--out", ""], "jema demo: argument --out: must name a folder; got an empty path"),
        (["--out", "{file}"], "jema demo: argument --out: '{file}' is not a folder"),
        (["--out", "{file}/under"], "('{file}' is a file); pass a folder to write into"),
    ],
)
def test_cli_bad_flags_are_one_line_naming_the_flag(tmp_path, args, message):
    file = tmp_path / "a-file"
    file.write_text("mine")
    args = [a.format(file=file) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "jema", "demo", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message.format(file=file) in result.stderr
    assert file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["a-file"]


def test_cli_out_in_a_read_only_place_is_refused_for_a_normal_user(shared_folder):
    read_only = shared_folder / "read-only"
    read_only.mkdir(mode=0o555)
    os.chmod(read_only, 0o555)  # mkdir's mode is masked by the umask

    def run_cli() -> str:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            try:
                main(["demo", "--out", str(read_only / "demo")])
            except SystemExit as e:
                return f"{e.code} {errors.getvalue()}"
        return "ran"

    outcome = as_normal_user(run_cli)
    os.chmod(read_only, 0o755)
    read_only.rmdir()
    assert outcome.startswith("2 jema demo: argument --out: cannot write into"), outcome
    assert f"{str(read_only)!r}" in outcome

"""Shared test settings: hypothesis profiles, and a folder a normal user can write to.

No deadlines (JIT compiles on first use), and derandomized: each run draws the same examples,
so CI cannot turn red on a case no developer has seen. To explore new cases, run with
``HYPOTHESIS_PROFILE=explore`` (random draws, 200 examples per test).
"""

import importlib.util
import os
import pathlib
import pwd
import re
import tempfile

import pytest
from hypothesis import HealthCheck, settings

common = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("jema", derandomize=True, max_examples=25, **common)
settings.register_profile("explore", max_examples=200, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jema"))


@pytest.fixture
def shared_folder():
    """A folder that ``nobody`` owns (the pytest folders of root are closed to it)."""
    folder = pathlib.Path(tempfile.mkdtemp())
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    yield folder
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


TORCH_MISSING = importlib.util.find_spec("torch") is None
TORCH_REASON = "needs torch, which is not installed (pip install 'jema[torch]')"
IMPORTS_TORCH = re.compile(r"^(import torch|from torch|from tests\.interop_models)\b", re.M)
LEFT_OUT: list[str] = []  # test modules built on torch, not collected without it


def pytest_ignore_collect(collection_path, config):
    """Without torch, leave out the test modules that import it at the top (listed at the end)."""
    path = pathlib.Path(collection_path)
    test_module = path.suffix == ".py" and path.name.startswith("test_")
    if TORCH_MISSING and test_module and IMPORTS_TORCH.search(path.read_text()):
        LEFT_OUT.append(path.name)
        return True
    return None


def pytest_terminal_summary(terminalreporter):
    """Say which test modules were left out for want of torch, and why."""
    if LEFT_OUT:
        names = ", ".join(sorted(set(LEFT_OUT)))
        terminalreporter.write_line(f"left out, {TORCH_REASON}: {names}")


def pytest_collection_modifyitems(config, items):
    """Without torch (e.g. on Python 3.12, where PyPI's torch is a multi-GB CUDA build), skip
    the doctests and notebooks that import it, saying so; the rest of the suite runs."""
    if not TORCH_MISSING:
        return
    for item in items:
        if _uses_torch(item):
            item.add_marker(pytest.mark.skip(reason=TORCH_REASON))


def _uses_torch(item) -> bool:
    test = getattr(item, "dtest", None)
    if test is not None:  # its examples import torch, or it says it needs PyTorch (Raises)
        needs = "PyTorch is not installed" in (test.docstring or "")
        return needs or any("torch" in e.source for e in test.examples)
    path = pathlib.Path(str(item.fspath))
    return path.suffix == ".ipynb" and "import torch" in path.read_text()

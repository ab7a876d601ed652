"""Shared test settings: hypothesis profiles, and a folder a normal user can write to.

No deadlines (JIT compiles on first use), and derandomized: each run draws the same examples,
so CI cannot turn red on a case no developer has seen. To explore new cases, run with
``HYPOTHESIS_PROFILE=explore`` (random draws, 200 examples per test).
"""

import doctest
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


def pytest_configure(config):
    """Without torch (CI's Python 3.13 leg: PyPI's torch is a multi-GB CUDA build), the suite
    runs what does not need it and says what it left out. A plugin, not hooks of this
    conftest, so that it rules the package's doctests too (a conftest's own collection and
    report hooks reach only the files below it)."""
    if TORCH_MISSING:
        config.pluginmanager.register(WithoutTorch(), "jema-without-torch")


class WithoutTorch:
    """The rules of a run without torch."""

    def pytest_ignore_collect(self, collection_path):
        """Leave out the modules that import torch at the top: test modules (listed at the
        end) and the torch twins that ``--doctest-modules`` would import."""
        path = pathlib.Path(collection_path)
        if not (path.suffix == ".py" and IMPORTS_TORCH.search(path.read_text())):
            return None
        if path.name.startswith("test_"):
            LEFT_OUT.append(path.name)
        return True

    def pytest_collection_modifyitems(self, items):
        """Skip the notebooks that import torch, saying so."""
        for item in items:
            path = pathlib.Path(str(item.fspath))
            if path.suffix == ".ipynb" and "import torch" in path.read_text():
                item.add_marker(pytest.mark.skip(reason=TORCH_REASON))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """A doctest that fails only because ``import torch`` fails is skipped, saying so: the
        examples of the functions built on torch, however they reach it."""
        outcome = yield
        report = outcome.get_result()
        if call.when == "call" and call.excinfo and _for_want_of_torch(call.excinfo.value):
            report.outcome = "skipped"
            report.longrepr = (
                str(item.path),
                item.reportinfo()[1] or 0,
                f"Skipped: {TORCH_REASON}",
            )

    def pytest_terminal_summary(self, terminalreporter):
        """Say which test modules were left out for want of torch, and why."""
        if LEFT_OUT:
            names = ", ".join(sorted(set(LEFT_OUT)))
            terminalreporter.write_line(f"left out, {TORCH_REASON}: {names}")


def _for_want_of_torch(failure: BaseException) -> bool:
    """Whether a doctest failure is an example's ``ModuleNotFoundError`` for torch."""
    failures = getattr(failure, "failures", [failure])  # MultipleDoctestFailure holds several
    unexpected = [f.exc_info[1] for f in failures if isinstance(f, doctest.UnexpectedException)]
    if not unexpected or len(unexpected) != len(failures):
        return False
    return all(_torch_import_error(error) for error in unexpected)


def _torch_import_error(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name == "torch":
            return True
        error = error.__cause__ or error.__context__
    return False

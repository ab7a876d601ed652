"""Shared test settings: hypothesis profiles, and a folder a normal user can write to.

No deadlines (JIT compiles on first use), and derandomized: each run draws the same examples,
so CI cannot turn red on a case no developer has seen. To explore new cases, run with
``HYPOTHESIS_PROFILE=explore`` (random draws, 200 examples per test).
"""

import os
import pathlib
import pwd
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

"""``dir(jema)`` and ``dir(interop)`` show the public API only, and every name in it resolves."""

import subprocess
import sys

import pytest

import interop
import jema

# reached as ``jema.<name>`` but left out of ``__all__``, so ``from jema import *`` loads no flax
# and hides no common name (``nnx``, ``TrainState``, ``exp``)
JEMA_ATTRIBUTES = {"checkpoint", "kd", "nnx", "posthoc", "TrainState", "finalize", "exp"}


def public(module) -> set[str]:
    return {name for name in dir(module) if not name.startswith("__")}


def test_dir_of_jema_is_its_all_and_the_names_reached_as_attributes():
    assert public(jema) == set(jema.__all__) | JEMA_ATTRIBUTES
    assert not set(jema.__all__) & JEMA_ATTRIBUTES
    assert {"__version__", "__doc__"} <= set(dir(jema))


def test_dir_of_interop_is_its_all():
    assert public(interop) == set(interop.__all__)
    assert "__jema__" in dir(interop)


@pytest.mark.parametrize("module", [jema, interop])
def test_every_name_dir_lists_resolves(module):
    assert set(module.__all__) <= set(dir(module))
    assert [name for name in dir(module) if not hasattr(module, name)] == []


def test_the_lazy_integrations_stay_lazy_and_importable_by_path():
    code = (
        "import sys, jema\n"
        "names = dir(jema)\n"
        "assert 'nnx' in names and 'flax' not in sys.modules, sorted(sys.modules)\n"
        "import jema.nnx, jema.checkpoint\n"
        "from jema import TrainState, finalize, exp\n"
        "from jema import *\n"
        "assert 'nnx' not in globals() and 'with_ema' in globals()\n"
        "assert sorted(dir(jema)) == sorted(names) == dir(jema)\n"
        "print(jema.nnx.__name__, jema.checkpoint.__name__, TrainState.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["jema.nnx", "jema.checkpoint", "jema.train_state"]

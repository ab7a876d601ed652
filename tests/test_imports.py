"""``import jema`` costs jax + optax: the Flax integrations load on first use, the app never."""

import subprocess
import sys

import pytest

import jema

HEAVY = ("flax", "orbax", "torch", "sklearn", "matplotlib", "tqdm")


def loaded_after(code: str) -> list[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` in a new Python."""
    probe = f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return [name for name in HEAVY if f"'{name}'" in out.stdout]


def test_import_jema_loads_neither_flax_orbax_torch_nor_the_apps_packages():
    assert loaded_after("import jema") == []


def test_reading_the_ema_of_an_optax_state_loads_no_flax():
    code = (
        "import jax.numpy as jnp, optax, jema\n"
        "state = jema.with_ema(optax.sgd(0.1)).init({'w': jnp.ones(2)})\n"
        "state = jema.attach_batch_stats(state, {'mean': jnp.zeros(2)})\n"
        "assert jema.ema_params(state)['w'].tolist() == [1.0, 1.0]\n"
        "assert jema.ema_batch_stats(state)['mean'].tolist() == [0.0, 0.0]"
    )
    assert loaded_after(code) == []


def test_star_import_loads_no_flax():
    assert loaded_after("from jema import *") == []


def test_the_command_line_loads_no_torch():
    assert "torch" not in loaded_after("import jema._app.cli")


@pytest.mark.parametrize(
    "namespace",
    ["builtins", "math", "numpy", "jax", "jax.numpy", "optax", "flax", "flax.nnx", "flax.linen"],
)
def test_star_import_shadows_no_name_of_a_common_namespace(namespace):
    module = __import__(namespace, fromlist=["_"])
    assert sorted(set(jema.__all__) & set(dir(module))) == []


def test_every_name_in_all_and_every_lazy_name_resolves():
    import jema.train_state

    for name in jema.__all__:
        assert getattr(jema, name) is not None
    assert jema.TrainState is jema.train_state.TrainState
    assert jema.finalize is jema.train_state.finalize
    assert {"nnx", "kd", "checkpoint", "TrainState"} <= set(dir(jema))
    assert jema.nnx.__name__ == "jema.nnx" and jema.checkpoint.__name__ == "jema.checkpoint"
    with pytest.raises(AttributeError, match="no attribute 'digits'"):
        jema.digits  # noqa: B018


def test_without_fcntl_the_package_imports_and_a_save_lock_says_why_it_cannot_lock(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['fcntl'] = None  # as on Windows: importing it raises ImportError\n"
        "sys.modules['msvcrt'] = None\n"
        "import jema, jema.checkpoint, jema.posthoc, jema._orbax, interop\n"
        "try:\n"
        f"    with jema._orbax.save_lock({str(tmp_path)!r}):\n"
        "        pass\n"
        "except OSError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "refused: [Errno 38] this platform has neither fcntl nor msvcrt file locks" in out.stdout
    assert ".jema-save.lock" in out.stdout

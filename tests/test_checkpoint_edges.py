"""Checkpoint folders at their edges: what sits where the save lock goes, leaves orbax cannot
save, temporary folders a killed save left, steps and template leaves of the wrong kind, and
an EMA in host memory restored into a ``jax.eval_shape`` template."""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jema
from jema import checkpoint, posthoc
from jema._orbax import LOCK_NAME
from jema.train_state import TrainState


def make_state(params=None, **ema):
    params = {"w": jnp.arange(3.0)} if params is None else params
    return TrainState.create(apply_fn=None, params=params, tx=jema.with_ema(optax.sgd(0.1), **ema))


def saved_steps(folder):
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def save_in_thread(folder, step, state):
    """``checkpoint.save`` in a thread: (its exception or None, whether it was still running)."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            checkpoint.save(folder, step, state)
            outcome.append(None)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    return (outcome[0] if outcome else None), thread.is_alive()


def test_a_fifo_where_the_lock_goes_fails_at_once_naming_it(tmp_path):
    os.mkfifo(tmp_path / LOCK_NAME)
    error, hung = save_in_thread(tmp_path, 1, make_state())
    assert not hung
    assert isinstance(error, OSError) and "the save lock must be a regular file" in str(error)
    assert LOCK_NAME in str(error) and saved_steps(tmp_path) == []


def test_a_fifo_with_a_reader_is_refused_too(tmp_path):
    fifo = tmp_path / LOCK_NAME
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        error, hung = save_in_thread(tmp_path, 1, make_state())
    finally:
        os.close(reader)
    assert not hung and isinstance(error, OSError) and "must be a regular file" in str(error)


def test_a_folder_where_the_lock_goes_is_a_clear_error(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(OSError, match=r"the save lock must be a regular file.*a folder") as e:
        checkpoint.save(tmp_path, 1, make_state())
    assert e.value.filename == os.path.join(tmp_path, LOCK_NAME)
    assert saved_steps(tmp_path) == []


def test_a_dangling_symlink_where_the_lock_goes_creates_nothing(tmp_path):
    target = tmp_path / "elsewhere" / "made-by-the-lock"
    (tmp_path / "elsewhere").mkdir()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(target, folder / LOCK_NAME)
    with pytest.raises(OSError, match="must be a regular file"):
        checkpoint.save(folder, 1, make_state())
    assert not target.exists() and os.listdir(tmp_path / "elsewhere") == []


def test_a_zero_size_leaf_is_refused_before_orbax_names_it_and_leaves_nothing(tmp_path):
    state = make_state({"w": jnp.ones(2), "empty": jnp.zeros((0, 3))})
    with pytest.raises(ValueError, match=r"no elements.*\.params\['empty'\] \(0, 3\)"):
        checkpoint.save(tmp_path, 4, state)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1764672000"])
def test_temporary_folders_a_killed_save_left_are_removed_by_the_next_save(tmp_path, name):
    state = make_state()
    checkpoint.save(tmp_path, 1, state)
    stale = tmp_path / name
    (stale / "default").mkdir(parents=True)  # orbax's layout: the step's item inside
    (stale / "default" / "half-written").write_bytes(b"\0" * 10)
    checkpoint.save(tmp_path, 2, state.replace(step=jnp.int32(2)))
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, "1", "2"]
    checkpoint.save(tmp_path, 3, state.replace(step=jnp.int32(3)))
    assert int(checkpoint.restore(tmp_path, state).step) == 3


def test_snapshot_saves_remove_them_too(tmp_path):
    tx = optax.chain(optax.sgd(0.1), jema.power_ema((0.05, 0.1)))
    params = {"w": jnp.ones(3)}
    _, opt_state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    (tmp_path / "5.orbax-checkpoint-tmp").mkdir()
    posthoc.save_snapshot(tmp_path, opt_state)
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, "1"]


@pytest.mark.parametrize("step", [7.0, "7", True, None])
def test_restore_refuses_a_step_that_is_not_an_int(tmp_path, step):
    checkpoint.save(tmp_path, 7, make_state())
    if step is None:  # None is the latest
        assert int(jema.ema_count(checkpoint.restore(tmp_path, make_state()).opt_state)) == 0
        return
    with pytest.raises(TypeError, match=f"step must be a non-negative int; got {step!r}"):
        checkpoint.restore(tmp_path, make_state(), step=step)


def test_restore_accepts_numpy_int_steps(tmp_path):
    state = make_state()
    checkpoint.save(tmp_path, 7, state.replace(step=jnp.int32(7)))
    assert int(checkpoint.restore(tmp_path, state, step=np.int64(7)).step) == 7


def test_python_and_numpy_scalar_template_leaves_take_the_saved_values(tmp_path):
    tree = {"a": jnp.arange(2.0), "f": jnp.float32(1.5), "n": jnp.int32(9), "b": jnp.bool_(True)}
    checkpoint.save(tmp_path, 1, tree)
    template = {"a": jnp.zeros(2), "f": 0.0, "n": np.int64(0), "b": np.bool_(False)}
    restored = checkpoint.restore(tmp_path, template)
    assert restored["a"].tolist() == [0.0, 1.0]
    assert (float(restored["f"]), int(restored["n"]), bool(restored["b"])) == (1.5, 9, True)
    assert [restored[k].dtype for k in ("f", "n", "b")] == [jnp.float32, jnp.int32, jnp.bool_]


def test_a_template_leaf_that_is_no_array_nor_number_is_a_type_error_naming_it(tmp_path):
    checkpoint.save(tmp_path, 1, {"a": jnp.ones(2), "s": jnp.int32(3)})
    with pytest.raises(TypeError, match="the template's leaf s is a str"):
        checkpoint.restore(tmp_path, {"a": jnp.ones(2), "s": "3"})


def test_a_host_memory_ema_restored_into_an_eval_shape_template_goes_back_to_host(tmp_path):
    ema = {"decay": 0.5, "decay_type": "constant", "ema_memory_kind": "pinned_host"}
    state = make_state(**ema)
    step = jax.jit(
        lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params)),
        donate_argnums=0,
    )
    state = step(state)
    checkpoint.save(tmp_path, 1, state)
    template = jax.eval_shape(lambda: make_state(**ema))
    restored = checkpoint.restore(tmp_path, template)
    assert jema.ema_params(restored.opt_state)["w"].sharding.memory_kind == "pinned_host"
    assert restored.params["w"].sharding.memory_kind == "device"
    on, again = step(step(restored)), step(step(state))  # donated: no abort
    assert jema.ema_params(on.opt_state)["w"].sharding.memory_kind == "pinned_host"
    w = np.arange(3.0) - 0.1  # after the first step; each later step subtracts 0.1 more
    expected = 0.5 * (0.5 * (0.5 * np.arange(3.0) + 0.5 * w) + 0.5 * (w - 0.1)) + 0.5 * (w - 0.2)
    np.testing.assert_allclose(np.asarray(jema.ema_params(on.opt_state)["w"]), expected, 1e-6)
    assert np.array_equal(jema.ema_params(on.opt_state)["w"], jema.ema_params(again.opt_state)["w"])

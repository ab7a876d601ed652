"""Checkpoints: bitwise-exact resume through orbax (linen, nnx), SG-layout export with the EMA."""

import fcntl
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import interop
import jema
import jema.nnx
from jema.checkpoint import export_pth, restore, save
from jema.kd import linen_kd_steps
from jema.train_state import finalize
from tests.flax_models import batches, linen_state, linen_train_step, nnx_train_step, nnx_training

N = 3


def assert_bit_identical(a, b):
    """Same leaves at the same paths, equal bit for bit (static fields like apply_fn ignored)."""
    leaves_a, leaves_b = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
    assert [jax.tree_util.keystr(p) for p, _ in leaves_a] == [
        jax.tree_util.keystr(p) for p, _ in leaves_b
    ]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


def test_linen_resume_is_bitwise_exact(tmp_path):
    data = batches(2 * N)
    straight = linen_state(decay=0.9, decay_type="threshold")
    for x, y in data:
        straight = linen_train_step(straight, x, y)

    first = linen_state(decay=0.9, decay_type="threshold")
    for x, y in data[:N]:
        first = linen_train_step(first, x, y)
    save(tmp_path, N, first)
    resumed = restore(tmp_path, linen_state(seed=1, decay=0.9, decay_type="threshold"))
    assert_bit_identical(resumed, first)
    for x, y in data[N:]:
        resumed = linen_train_step(resumed, x, y)

    assert_bit_identical(resumed, straight)  # params, batch_stats, step, optimizer state, EMA
    assert int(jema.ema_count(resumed.opt_state)) == 2 * N
    assert_bit_identical(resumed.ema_variables(), straight.ema_variables())


def test_nnx_resume_is_bitwise_exact_and_restores_in_place(tmp_path):
    data = batches(2 * N)
    straight = nnx_training()
    for x, y in data:
        nnx_train_step(*straight, x, y)

    first = nnx_training()
    for x, y in data[:N]:
        nnx_train_step(*first, x, y)
    save(tmp_path, N, first)
    resumed = nnx_training(seed=1)
    assert restore(tmp_path, resumed) is resumed
    for x, y in data[N:]:
        nnx_train_step(*resumed, x, y)

    assert_bit_identical(nnx.state(resumed), nnx.state(straight))
    assert int(jema.ema_count(resumed[1].opt_state)) == 2 * N
    assert_bit_identical(
        jema.ema_batch_stats(resumed[1].opt_state), jema.ema_batch_stats(straight[1].opt_state)
    )


def test_restore_picks_a_step_and_works_with_a_caller_manager(tmp_path):
    import orbax.checkpoint as ocp

    states = [linen_state()]
    for x, y in batches(2):
        states.append(linen_train_step(states[-1], x, y))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        for step, state in enumerate(states):
            save(manager, step, state)
        manager.wait_until_finished()
        assert_bit_identical(restore(manager, states[0], step=1), states[1])
    assert_bit_identical(restore(tmp_path / "ckpt", states[0]), states[2])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore(tmp_path / "empty", states[0])


def load(path, template, which):
    return interop.load_checkpoint(path, template, which=which)


def trained_linen(steps=3, **kwargs):
    state = linen_state(decay=0.7, decay_type="constant", **kwargs)
    for x, y in batches(steps, seed=4):
        state = linen_train_step(state, x, y)
    return state


def test_export_pth_writes_net_and_ema_net(tmp_path):
    torch = pytest.importorskip("torch")
    state = trained_linen()
    path = tmp_path / "ckpt.pth"
    export_pth(path, state, epoch=2)
    checkpoint = torch.load(path, weights_only=True)
    assert sorted(checkpoint) == ["ema_net", "epoch", "net"]
    assert checkpoint["epoch"] == 2
    raw = {"params": state.params, "batch_stats": state.batch_stats}
    assert_bit_identical(load(path, raw, "net"), raw)
    assert_bit_identical(load(path, raw, "ema_net"), state.ema_variables())
    # a model loaded from it gets the EMA (SG prefers ema_net), like finalize
    final = finalize(state)
    assert_bit_identical(
        load(path, raw, "auto"), {"params": final.params, "batch_stats": final.batch_stats}
    )


def test_export_pth_for_nnx(tmp_path):
    model, optimizer = nnx_training()
    for x, y in batches(2):
        nnx_train_step(model, optimizer, x, y)
    path = tmp_path / "nnx.safetensors"  # the format that needs no torch
    export_pth(path, (model, optimizer))
    template = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    assert_bit_identical(nnx.as_pure(load(path, template, "net")), nnx.as_pure(template))
    ema = load(path, template, "ema_net")
    assert_bit_identical(
        nnx.as_pure(ema["bn"]["mean"]), jema.ema_batch_stats(optimizer.opt_state)["bn"]["mean"]
    )
    assert_bit_identical(
        nnx.as_pure(ema["dense1"]["kernel"]),
        jema.ema_params(optimizer.opt_state)["dense1"]["kernel"],
    )
    with pytest.raises(TypeError, match="student must be"):
        export_pth(path, model)


def test_kd_export_and_a_teacher_loaded_from_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    teacher_state = trained_linen(hidden=16)
    teacher_path = tmp_path / "teacher.pth"
    export_pth(teacher_path, teacher_state)
    template = {"params": teacher_state.params, "batch_stats": teacher_state.batch_stats}
    teacher = interop.load_checkpoint(teacher_path, template)  # ema_net, as SG does
    assert_bit_identical(teacher, teacher_state.ema_variables())

    student = linen_state()
    train_step, _ = linen_kd_steps(teacher_state.apply_fn)
    for x, y in batches(2):
        student, _ = train_step(student, teacher, x, y)
    kd_path = tmp_path / "kd.pth"
    export_pth(kd_path, student, teacher=teacher)
    checkpoint = torch.load(kd_path, weights_only=True)
    for section in ("net", "ema_net"):
        prefixes = {key.split(".")[0] for key in checkpoint[section]}
        assert prefixes == {"student", "teacher"}
    assert_bit_identical(interop.load_checkpoint(kd_path, template, prefix="teacher."), teacher)
    student_template = {"params": student.params, "batch_stats": student.batch_stats}
    assert_bit_identical(
        interop.load_checkpoint(kd_path, student_template, prefix="student."),
        student.ema_variables(),
    )


def test_saving_an_existing_step_is_refused_and_keeps_the_checkpoint(tmp_path):
    first = linen_state()
    x, y = next(iter(batches(1)))
    second = linen_train_step(first, x, y)
    save(tmp_path / "ckpt", 5, first)
    with pytest.raises(ValueError, match=r"checkpoint step 5 already exists in .*ckpt"):
        save(tmp_path / "ckpt", 5, second)
    assert_bit_identical(restore(tmp_path / "ckpt", first), first)


def test_restore_names_missing_steps_and_folders_and_creates_nothing(tmp_path):
    state = linen_state()
    save(tmp_path / "ckpt", 3, state)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 in .*; saved steps: \[3\]"):
        restore(tmp_path / "ckpt", state, step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        restore(tmp_path / "nowhere", state)
    assert not (tmp_path / "nowhere").exists()


def test_restore_refuses_a_template_that_would_cast_or_drop_the_ema(tmp_path):
    save(tmp_path / "ckpt", 0, linen_state())
    bf16 = linen_state(ema_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"ema/.*saved \(.*\) float32, template \(.*\) bfloat16"):
        restore(tmp_path / "ckpt", bf16)


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (-1, ValueError, "step must be a non-negative int; got -1"),
        (2.0, TypeError, "step must be a non-negative int; got 2.0"),
        ("3", TypeError, "step must be a non-negative int; got '3'"),
        (True, TypeError, "step must be a non-negative int; got True"),
    ],
)
def test_save_refuses_a_step_that_is_not_a_non_negative_int(tmp_path, step, error, message):
    with pytest.raises(error, match=message):
        save(tmp_path / "ckpt", step, linen_state())
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("[0-9]*"))


def test_a_step_below_the_latest_is_refused_not_dropped(tmp_path):
    state = linen_state()
    save(tmp_path / "ckpt", 10, state)
    save(tmp_path / "ckpt", np.int64(20), state)
    with pytest.raises(
        ValueError, match=r"step 15 is below saved steps \[20\] in .*ckpt.*new folder"
    ):
        save(tmp_path / "ckpt", 15, state)
    (tmp_path / "other").mkdir()
    save(tmp_path / "other", 15, state)  # the advice works
    assert_bit_identical(restore(tmp_path / "other", state), state)


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )


SAVE_ONE = """
import sys, jax.numpy as jnp, optax, jema
from jema.checkpoint import save
state = jema.TrainState.create(apply_fn=None, params={{"w": jnp.ones(2)}},
                               tx=jema.with_ema(optax.sgd(0.1)))
try:
    save({path!r}, {step}, state)
except OSError as e:
    print(type(e).__name__, e)
    sys.exit(1)
"""


def test_saving_into_a_file_fails_at_once_and_the_process_exits(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("mine")
    start = time.monotonic()
    done = run_python(SAVE_ONE.format(path=str(target), step=1))
    assert done.returncode == 1, done.stderr
    assert "NotADirectoryError [Errno 20] the checkpoint folder is a file" in done.stdout
    assert str(target) in done.stdout and time.monotonic() - start < 30
    assert target.read_text() == "mine"


def test_a_second_process_saving_into_a_busy_folder_fails_fast(tmp_path):
    folder = tmp_path / "ckpt"
    save(folder, 1, linen_state())
    with open(folder / ".jema-save.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a save in progress elsewhere
        done = run_python(SAVE_ONE.format(path=str(folder), step=2))
    assert done.returncode == 1, done.stderr
    assert "BlockingIOError" in done.stdout and "another process is saving into" in done.stdout
    assert sorted(p.name for p in folder.glob("[0-9]*")) == ["1"]


def test_two_processes_saving_at_once_leave_only_restorable_steps(tmp_path):
    folder = tmp_path / "ckpt"
    code = SAVE_ONE.replace(
        "save({path!r}, {step}, state)", "for s in {step}: save({path!r}, s, state)"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code.format(path=str(folder), step=steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for steps in ([1, 3, 5], [2, 4, 6])
    ]
    outs = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, outs, strict=True):
        assert run.returncode in (0, 1), err
        if run.returncode:
            assert "another process is saving into" in out or "is below saved steps" in err + out
    state = jema.TrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=jema.with_ema(optax.sgd(0.1))
    )
    steps = sorted(int(p.name) for p in folder.glob("[0-9]*"))
    assert steps
    for step in steps:
        restore(folder, state, step=step)


def test_restore_into_a_template_with_a_python_step(tmp_path):
    state = linen_state()
    save(tmp_path / "ckpt", 0, state)
    restored = restore(tmp_path / "ckpt", state.replace(step=5))
    assert restored.step.dtype == jnp.int32 and int(restored.step) == int(state.step)
    assert_bit_identical(restored, state)

"""Knowledge distillation: KDLogitsLoss parity with PyTorch, properties, frozen-teacher steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jema
import jema.nnx
from jema.kd import kd_logits_loss, linen_kd_steps, nnx_kd_steps
from tests.flax_models import CLASSES, LinenNet, NnxNet, batches, linen_state, nnx_training

SHAPE = (3, 5)  # one shape: each new shape would compile again
logits_arrays = hnp.arrays(np.float32, SHAPE, elements=st.floats(-20, 20, width=32))
loss_fn = jax.jit(kd_logits_loss, static_argnames="distillation_loss_coeff")


def torch_kd_loss(student, teacher, labels, coeff):
    torch = pytest.importorskip("torch")
    s, t = torch.from_numpy(np.asarray(student)), torch.from_numpy(np.asarray(teacher))
    task = torch.nn.CrossEntropyLoss()(s, torch.from_numpy(np.asarray(labels)).long())
    kd = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s, dim=1), torch.softmax(t, dim=1)
    )
    return {"Loss": task * (1 - coeff) + kd * coeff, "Task Loss": task, "Distillation Loss": kd}


@pytest.mark.parametrize("coeff", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_matches_torch_kd_logits_loss(coeff, scale):
    rng = np.random.default_rng(int(coeff * 4 + scale))
    student = (scale * rng.normal(size=(16, 10))).astype(np.float32)
    teacher = (scale * rng.normal(size=(16, 10))).astype(np.float32)
    labels = rng.integers(0, 10, size=16)
    loss, parts = loss_fn(student, teacher, labels, distillation_loss_coeff=coeff)
    expected = torch_kd_loss(student, teacher, labels, coeff)
    assert sorted(parts) == ["Distillation Loss", "Loss", "Task Loss"]
    assert float(loss) == float(parts["Loss"])
    for name, value in expected.items():
        np.testing.assert_allclose(parts[name], value.item(), rtol=1e-6, atol=1e-6, err_msg=name)


@given(logits_arrays, st.data())
def test_distillation_is_nonnegative_and_matches_torch(student, data):
    teacher = data.draw(
        hnp.arrays(np.float32, student.shape, elements=st.floats(-20, 20, width=32))
    )
    labels = np.zeros(student.shape[0], np.int64)
    _, parts = kd_logits_loss(student, teacher, labels)
    assert float(parts["Distillation Loss"]) >= -1e-6
    expected = torch_kd_loss(student, teacher, labels, 0.5)["Distillation Loss"].item()
    np.testing.assert_allclose(parts["Distillation Loss"], expected, rtol=1e-5, atol=1e-5)


@given(logits_arrays)
def test_no_distillation_loss_when_student_equals_teacher(logits):
    _, parts = loss_fn(logits, logits, np.zeros(SHAPE[0], np.int32))
    assert abs(float(parts["Distillation Loss"])) <= 1e-6


@given(logits_arrays, logits_arrays)
def test_coefficient_endpoints_select_one_part(student, teacher):
    labels = np.ones(SHAPE[0], np.int32)
    loss0, parts0 = loss_fn(student, teacher, labels, distillation_loss_coeff=0.0)
    loss1, parts1 = loss_fn(student, teacher, labels, distillation_loss_coeff=1.0)
    assert float(loss0) == float(parts0["Task Loss"])
    assert float(loss1) == float(parts1["Distillation Loss"])


def test_custom_task_loss_and_bad_arguments():
    s, t, y = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 3))
    _, parts = kd_logits_loss(s, t, y, task_loss_fn=lambda logits, target: jnp.sum(logits - target))
    assert float(parts["Task Loss"]) == 0.0
    with pytest.raises(ValueError, match=r"same shape"):
        kd_logits_loss(s, jnp.zeros((2, 4)), y)
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="distillation_loss_coeff"):
            kd_logits_loss(s, t, y, distillation_loss_coeff=bad)
    with pytest.raises(ValueError, match="distillation_loss_coeff"):
        nnx_kd_steps(distillation_loss_coeff=2)


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_bit_identical(before, after):
    assert jax.tree.structure(before) == jax.tree.structure(after)
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_linen_kd_step_freezes_teacher_and_trains_only_the_student():
    teacher = LinenNet(hidden=16)
    x0 = batches(1, seed=5)[0][0]
    t_vars = jax.jit(teacher.init, static_argnames="train")(jax.random.key(7), x0, train=False)
    # non-trivial teacher statistics, so eval mode (running averages) is visible
    _, t_stats = jax.jit(teacher.apply, static_argnames=("train", "mutable"))(
        t_vars, x0 * 3 + 1, train=True, mutable=("batch_stats",)
    )
    t_vars = {"params": t_vars["params"], **t_stats}
    before = snapshot(t_vars)
    state = linen_state(decay=0.9, decay_type="constant")
    train_step, eval_step = linen_kd_steps(teacher.apply, distillation_loss_coeff=0.7)
    x, y = batches(1)[0]

    # one step equals the hand-written one: teacher in eval mode, gradient of the student only
    def manual_loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        t_logits = teacher.apply(t_vars, x, train=False)
        return kd_logits_loss(logits, t_logits, y, distillation_loss_coeff=0.7)[0], upd

    @jax.jit
    def manual_step(state):
        grads, upd = jax.grad(manual_loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"])

    expected = manual_step(state)
    stepped, parts = train_step(state, t_vars, x, y)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stepped, expected
    )
    assert float(parts["Loss"]) == pytest.approx(
        float(jax.jit(manual_loss)(state.params)[0]), rel=1e-6
    )

    for xb, yb in batches(4, seed=1):
        stepped, parts = train_step(stepped, t_vars, xb, yb)
    assert_bit_identical(before, t_vars)
    assert jax.tree.structure(stepped) == jax.tree.structure(state)
    assert [np.shape(leaf) for leaf in jax.tree.leaves(stepped)] == [
        np.shape(leaf) for leaf in jax.tree.leaves(state)
    ]
    assert int(jema.ema_count(stepped.opt_state)) == 5

    ev_parts, logits = eval_step(stepped, t_vars, x, y)
    ema_logits = jax.jit(stepped.apply_fn, static_argnames="train")(
        stepped.ema_variables(), x, train=False
    )
    np.testing.assert_allclose(logits, ema_logits, rtol=1e-6, atol=1e-6)
    t_logits = jax.jit(teacher.apply, static_argnames="train")(t_vars, x, train=False)
    _, expected_parts = loss_fn(ema_logits, t_logits, y, distillation_loss_coeff=0.7)
    for name in expected_parts:
        np.testing.assert_allclose(ev_parts[name], expected_parts[name], rtol=1e-5)


def test_linen_kd_step_with_dropout_rng_and_no_train_arg():
    import flax.linen as nn

    student, teacher = nn.Dense(CLASSES), nn.Dense(CLASSES)
    x, y = batches(1)[0]
    s_vars, t_vars = student.init(jax.random.key(0), x), teacher.init(jax.random.key(1), x)
    state = jema.train_state.TrainState.create(
        apply_fn=student.apply, params=s_vars["params"], tx=jema.with_ema(optax.sgd(0.1))
    )
    train_step, _ = linen_kd_steps(teacher.apply, train_arg=None)
    new, _ = train_step(state, t_vars, x, y, jax.random.key(3))
    assert new.batch_stats is None
    assert int(jema.ema_count(new.opt_state)) == 1


def test_nnx_kd_step_freezes_teacher_and_evaluates_the_ema_student():
    teacher = NnxNet(hidden=16, rngs=nnx.Rngs(9))
    teacher.bn.mean[...] = jnp.linspace(-1.0, 1.0, 16)  # eval mode must use these
    teacher.train()  # the step must not rely on the caller's mode, nor change it
    before = snapshot(nnx.state(teacher))
    model, optimizer = nnx_training(decay=0.9)
    fresh_model, fresh_optimizer = nnx_training(decay=0.9)
    train_step, eval_step = nnx_kd_steps(distillation_loss_coeff=0.3)
    model.train()
    for x, y in batches(4):
        parts = train_step(model, optimizer, teacher, x, y)
    assert sorted(parts) == ["Distillation Loss", "Loss", "Task Loss"]
    assert_bit_identical(before, snapshot(nnx.state(teacher)))
    assert teacher.bn.use_running_average is False
    assert jax.tree.structure(nnx.state((model, optimizer))) == jax.tree.structure(
        nnx.state((fresh_model, fresh_optimizer))
    )
    assert int(jema.ema_count(optimizer.opt_state)) == 4
    # the EMA statistics moved away from the initial ones
    assert not np.allclose(jema.ema_batch_stats(optimizer.opt_state)["bn"]["mean"], 0.0)

    x, y = batches(1, seed=3)[0]
    raw = snapshot(nnx.state(model))
    with jema.nnx.ema_weights(optimizer, model):
        parts, logits = eval_step(model, teacher, x, y)
        model.eval()
        expected_logits = model(x)
        t_logits = nnx.view(teacher, use_running_average=True)(x)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6, atol=1e-6)
    _, expected = kd_logits_loss(expected_logits, t_logits, y, distillation_loss_coeff=0.3)
    for name in expected:
        np.testing.assert_allclose(parts[name], expected[name], rtol=1e-5)
    assert_bit_identical(raw, snapshot(nnx.state(model)))


def test_task_loss_ignores_label_minus_100_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([1, -100, 3, 0, -100, 2])
    expected = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(labels))
    np.testing.assert_allclose(jema.kd.cross_entropy(logits, labels), expected.item(), rtol=1e-6)
    assert np.isnan(jema.kd.cross_entropy(logits, np.full(6, -100)))

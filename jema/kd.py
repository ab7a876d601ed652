"""Knowledge distillation: SG's ``KDLogitsLoss`` and train/eval steps with a frozen teacher.

Only the student is differentiated and averaged; the teacher's variables are an argument of
every step, run in eval mode behind ``jax.lax.stop_gradient``, and never stored in any state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jema import nnx as jema_nnx
from jema._checks import check_number, is_traced
from jema.train_state import TrainState

LossParts = dict[str, jax.Array]


IGNORE_INDEX = -100


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean softmax cross-entropy with integer labels, as PyTorch's ``CrossEntropyLoss()``.

    Labels equal to ``ignore_index`` (PyTorch's default -100) count neither in the sum nor in
    the mean; with every label ignored the result is NaN, as in PyTorch.

    Args:
      logits: ``(batch, ..., classes)``, classes on the last axis.
      labels: integer class indices, ``(batch, ...)``.
      ignore_index: the label value to leave out.

    Returns:
      A float scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(cross_entropy(jnp.zeros((3, 4)), jnp.array([0, -100, 3]))), 4)  # log 4
      1.3863
    """
    keep = labels != ignore_index
    safe_labels = jnp.where(keep, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.sum(keep)


def kd_logits_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    distillation_loss_coeff: float = 0.5,
    task_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> tuple[jax.Array, LossParts]:
    """SuperGradients' ``KDLogitsLoss``: ``task * (1 - c) + KL(teacher || student) * c``.

    The distillation term is PyTorch's ``KLDivLoss(reduction="batchmean")`` of
    ``log_softmax(student)`` against ``softmax(teacher)``: the sum over all elements of
    ``p_t * (log p_t - log p_s)`` divided by the batch size. Classes are on the last axis.

    Args:
      student_logits: ``(batch, ..., classes)``.
      teacher_logits: same shape as ``student_logits``.
      labels: what ``task_loss_fn`` takes with the student's logits (class indices for
        the default).
      distillation_loss_coeff: ``c``, in [0, 1].
      task_loss_fn: ``(student_logits, labels) -> scalar``; default :func:`cross_entropy`.

    Returns:
      ``(loss, parts)`` with ``parts = {"Loss", "Task Loss", "Distillation Loss"}``.

    Raises:
      ValueError: logits of different shapes, or a coefficient outside [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[2.0, 0.0]])
      >>> loss, parts = kd_logits_loss(s, s, jnp.array([0]))
      >>> float(parts["Distillation Loss"])
      0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "must have the same shape (batch, ..., classes)"
        )
    _check_coeff(distillation_loss_coeff)
    log_p_student = jax.nn.log_softmax(student_logits, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    kl = jnp.sum(p_teacher * (log_p_teacher - log_p_student)) / student_logits.shape[0]
    task = task_loss_fn(student_logits, labels)
    loss = task * (1 - distillation_loss_coeff) + kl * distillation_loss_coeff
    return loss, {"Loss": loss, "Task Loss": task, "Distillation Loss": kl}


def linen_kd_steps(
    teacher_apply_fn: Callable[..., Any],
    *,
    distillation_loss_coeff: float = 0.5,
    task_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    train_arg: str | None = "train",
) -> tuple[Callable[..., tuple[TrainState, LossParts]], Callable[..., tuple[LossParts, jax.Array]]]:
    """Jitted KD train and eval steps for a linen student in a :class:`jema.TrainState`.

    ``train_step(state, teacher_variables, inputs, labels, dropout_rng=None)`` runs the
    teacher in eval mode, differentiates the student (train mode, BatchNorm statistics
    updated and averaged by the EMA) and returns ``(new_state, parts)``.
    ``eval_step(state, teacher_variables, inputs, labels)`` evaluates the EMA student
    (``state.ema_variables()``) in eval mode and returns ``(parts, student_logits)``.

    Args:
      teacher_apply_fn: the teacher's ``model.apply``; its variables (e.g. from
        ``interop.load_checkpoint``, which prefers ``ema_net``) are passed to each step.
      distillation_loss_coeff: see :func:`kd_logits_loss`.
      task_loss_fn: see :func:`kd_logits_loss`.
      train_arg: the boolean keyword both models take to switch train/eval mode (flax's
        usual ``train``); None for models that take none.

    Returns:
      ``(train_step, eval_step)``.

    Raises:
      ValueError: a coefficient outside [0, 1].

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jema
      >>> from jema.train_state import TrainState
      >>> student, teacher = nn.Dense(3), nn.Dense(3)
      >>> x, y = jnp.ones((2, 4)), jnp.array([0, 2])
      >>> s_vars = student.init(jax.random.key(0), x)
      >>> t_vars = teacher.init(jax.random.key(1), x)
      >>> state = TrainState.create(apply_fn=student.apply, params=s_vars["params"],
      ...                           tx=jema.with_ema(optax.sgd(0.1)))
      >>> train_step, eval_step = linen_kd_steps(teacher.apply, train_arg=None)
      >>> state, parts = train_step(state, t_vars, x, y)
      >>> parts, logits = eval_step(state, t_vars, x, y)
    """
    _check_coeff(distillation_loss_coeff)
    loss_fn = functools.partial(
        kd_logits_loss, distillation_loss_coeff=distillation_loss_coeff, task_loss_fn=task_loss_fn
    )
    mode = (lambda train: {}) if train_arg is None else (lambda train: {train_arg: train})

    def teacher_logits(teacher_variables: Any, inputs: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(teacher_apply_fn(teacher_variables, inputs, **mode(False)))

    @jax.jit
    def train_step(
        state: TrainState,
        teacher_variables: Any,
        inputs: jax.Array,
        labels: jax.Array,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[TrainState, LossParts]:
        t_logits = teacher_logits(teacher_variables, inputs)
        rngs = (
            None
            if dropout_rng is None
            else {"dropout": jax.random.fold_in(dropout_rng, state.step)}
        )

        def student_loss(params: Any) -> tuple[jax.Array, tuple[LossParts, Any]]:
            if state.batch_stats is None:
                logits = state.apply_fn({"params": params}, inputs, rngs=rngs, **mode(True))
                stats = None
            else:
                variables = {"params": params, "batch_stats": state.batch_stats}
                logits, updated = state.apply_fn(
                    variables, inputs, rngs=rngs, mutable=["batch_stats"], **mode(True)
                )
                stats = updated["batch_stats"]
            loss, parts = loss_fn(logits, t_logits, labels)
            return loss, (parts, stats)

        grads, (parts, stats) = jax.grad(student_loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=stats), parts

    @jax.jit
    def eval_step(
        state: TrainState, teacher_variables: Any, inputs: jax.Array, labels: jax.Array
    ) -> tuple[LossParts, jax.Array]:
        logits = state.apply_fn(state.ema_variables(), inputs, **mode(False))
        _, parts = loss_fn(logits, teacher_logits(teacher_variables, inputs), labels)
        return parts, logits

    return train_step, eval_step


def nnx_kd_steps(
    *,
    distillation_loss_coeff: float = 0.5,
    task_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> tuple[Callable[..., LossParts], Callable[..., tuple[LossParts, jax.Array]]]:
    """Jitted KD train and eval steps for an nnx student and teacher.

    ``train_step(model, optimizer, teacher, inputs, labels)`` runs an eval-mode view of
    ``teacher`` (``teacher`` itself is not touched), differentiates the student's
    ``nnx.Param`` and updates it with :func:`jema.nnx.update` (BatchStat EMA included when
    attached); it returns ``parts``. Put the student in train mode (``model.train()``) first.
    ``eval_step(model, teacher, inputs, labels)`` runs eval-mode views of both and returns
    ``(parts, student_logits)``; call it inside ``with jema.nnx.ema_weights(optimizer, model):``
    to evaluate the EMA student.

    Args:
      distillation_loss_coeff: see :func:`kd_logits_loss`.
      task_loss_fn: see :func:`kd_logits_loss`.

    Returns:
      ``(train_step, eval_step)``.

    Raises:
      ValueError: a coefficient outside [0, 1].

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> from flax import nnx
      >>> student, teacher = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))
      >>> optimizer = nnx.Optimizer(student, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
      >>> train_step, eval_step = nnx_kd_steps()
      >>> x, y = jnp.ones((2, 4)), jnp.array([0, 2])
      >>> parts = train_step(student, optimizer, teacher, x, y)
      >>> with jema.nnx.ema_weights(optimizer, student):
      ...     parts, logits = eval_step(student, teacher, x, y)
    """
    _check_coeff(distillation_loss_coeff)
    loss_fn = functools.partial(
        kd_logits_loss, distillation_loss_coeff=distillation_loss_coeff, task_loss_fn=task_loss_fn
    )

    def teacher_logits(teacher: nnx.Module, inputs: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(_eval_view(teacher)(inputs))

    @nnx.jit
    def train_step(
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        teacher: nnx.Module,
        inputs: jax.Array,
        labels: jax.Array,
    ) -> LossParts:
        t_logits = teacher_logits(teacher, inputs)

        def student_loss(model: nnx.Module) -> tuple[jax.Array, LossParts]:
            return loss_fn(model(inputs), t_logits, labels)

        grads, parts = nnx.grad(student_loss, has_aux=True)(model)
        jema_nnx.update(optimizer, model, grads)
        return parts

    @nnx.jit
    def eval_step(
        model: nnx.Module, teacher: nnx.Module, inputs: jax.Array, labels: jax.Array
    ) -> tuple[LossParts, jax.Array]:
        logits = _eval_view(model)(inputs)
        _, parts = loss_fn(logits, teacher_logits(teacher, inputs), labels)
        return parts, logits

    return train_step, eval_step


def _eval_view(module: nnx.Module) -> nnx.Module:
    return nnx.view(module, deterministic=True, use_running_average=True, raise_if_not_found=False)


def _check_coeff(coeff: Any) -> None:
    if not is_traced(coeff):
        rule = "be a number in [0, 1]"
        check_number(coeff, "distillation_loss_coeff", rule, low=0, high=1, closed="both")

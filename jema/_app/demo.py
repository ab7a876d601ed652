"""``jema demo``: train a small CNN on the built-in digits with SG's EMA, end to end.

It shows the whole loop: raw vs EMA validation accuracy per epoch, a PNG of both curves, an
orbax checkpoint, an SG-layout ``.pth`` (``net`` + ``ema_net``, written without PyTorch: the
Flax models' default names are the PyTorch twin's), and, when PyTorch is installed, a PyTorch
twin that loads ``ema_net`` and predicts exactly what the Flax EMA model predicts. ``--kd``
distills a student from a teacher (whose EMA weights it uses, as SG does) instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jema
from jema import checkpoint, kd
from jema._app.digits import batches, load_digits_splits
from jema._app.models import DigitsCNN
from jema.train_state import TrainState


@dataclass
class DemoConfig:
    """The demo's settings (each one a ``jema demo`` flag).

    Attributes:
      epochs: passes over the training split.
      decay: the EMA's maximum decay, inside (0, 1).
      decay_type: a registered schedule ("threshold", "constant", "exp", ...).
      out: the output folder (created).
      kd: distill a small student from a wider teacher instead of training one CNN.
      batch_size: examples per optimizer step.
      learning_rate: SGD's learning rate (momentum 0.9).
      seed: seed of the initialisation and the batch order.
      progress: show tqdm progress bars.
    """

    epochs: int = 12
    decay: float = 0.999
    decay_type: str = "threshold"
    out: str = "jema-demo"
    kd: bool = False
    batch_size: int = 32
    learning_rate: float = 0.1
    seed: int = 0
    progress: bool = True


@dataclass
class History:
    """Validation accuracy per epoch of the raw and the EMA weights."""

    raw: list[float] = field(default_factory=list)
    ema: list[float] = field(default_factory=list)


def run(config: DemoConfig) -> dict[str, Any]:
    """Run the demo and write its outputs under ``config.out``.

    Args:
      config: the settings.

    Returns:
      A summary: ``history`` (raw/EMA accuracies), ``files`` (written paths),
      ``torch_agrees`` (None when PyTorch is not installed), and for ``--kd``
      ``teacher_accuracy``.

    Raises:
      ValueError: for settings out of range (e.g. ``epochs < 1``, a bad decay).

    Example:
      >>> config = DemoConfig(epochs=3, decay=0.99, out="demo-out")  # then: run(config)
      >>> config.decay_type, config.batch_size
      ('threshold', 32)
    """
    if not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f"epochs must be a positive int; got {config.epochs!r}")
    data = load_digits_splits(seed=config.seed)
    steps_per_epoch = len(data[0]) // config.batch_size
    tx = jema.with_ema(
        optax.sgd(config.learning_rate, momentum=0.9),
        decay=config.decay,
        decay_type=config.decay_type,
        total_steps=config.epochs * steps_per_epoch,
    )
    os.makedirs(config.out, exist_ok=True)  # only once the settings are known to be good
    summary: dict[str, Any] = {}
    teacher = None
    if config.kd:
        teacher_state, _ = _train(
            _new_state(32, tx, config.seed + 1), _plain_step, data, config, "teacher"
        )
        teacher = teacher_state.ema_variables()
        summary["teacher_accuracy"] = _accuracy(teacher_state.apply_fn, teacher, *data[2:])
        print(f"teacher (its EMA weights, as SG uses): {100 * summary['teacher_accuracy']:.2f} %")
        train_step, _ = kd.linen_kd_steps(DigitsCNN(32).apply)
        step_fn = lambda state, x, y: train_step(state, teacher, x, y)[0]  # noqa: E731
        state, history = _train(_new_state(8, tx, config.seed), step_fn, data, config, "student")
    else:
        state, history = _train(_new_state(16, tx, config.seed), _plain_step, data, config, "cnn")
    summary["history"] = history
    teacher_accuracy = summary.get("teacher_accuracy")
    summary["files"] = _write_outputs(state, teacher, teacher_accuracy, history, config)
    summary["torch_agrees"] = _check_torch_twin(summary["files"]["pth"], state, data[2], config)
    return summary


def _new_state(width: int, tx: optax.GradientTransformation, seed: int) -> TrainState:
    model = DigitsCNN(width)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )


@jax.jit
def _plain_step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updated = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return kd.cross_entropy(logits, y), updated["batch_stats"]

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)


def _train(
    state: TrainState,
    step_fn: Callable[[TrainState, np.ndarray, np.ndarray], TrainState],
    data: tuple[np.ndarray, ...],
    config: DemoConfig,
    label: str,
) -> tuple[TrainState, History]:
    from tqdm import tqdm

    x_train, y_train, x_val, y_val = data
    rng = np.random.default_rng(config.seed)
    history = History()
    total = config.epochs * (len(x_train) // config.batch_size)
    with tqdm(total=total, desc=label, disable=not config.progress, leave=False) as bar:
        for epoch in range(1, config.epochs + 1):
            for x, y in batches(x_train, y_train, config.batch_size, rng):
                state = step_fn(state, x, y)
                bar.update()
            history.raw.append(_accuracy(state.apply_fn, _raw_variables(state), x_val, y_val))
            history.ema.append(_accuracy(state.apply_fn, state.ema_variables(), x_val, y_val))
            bar.write(
                f"epoch {epoch}/{config.epochs} {label}: validation accuracy "
                f"raw {100 * history.raw[-1]:.2f} %, EMA {100 * history.ema[-1]:.2f} %"
            )
    return state, history


def _raw_variables(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _accuracy(apply_fn: Callable, variables: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(_logits(apply_fn, variables, x), -1) == y))


def _logits(apply_fn: Callable, variables: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(apply_fn)(variables, x))


def _write_outputs(
    state: TrainState,
    teacher: Any,
    teacher_accuracy: float | None,
    history: History,
    config: DemoConfig,
) -> dict[str, str]:
    name = "digits_kd" if config.kd else "digits_cnn"
    files = {
        "plot": os.path.join(config.out, f"{name}_accuracy.png"),
        "orbax": os.path.abspath(os.path.join(config.out, f"{name}_orbax")),
        "pth": os.path.join(config.out, f"{name}.pth"),
    }
    _plot(history, teacher_accuracy, files["plot"], config)
    if os.path.isdir(files["orbax"]):  # the previous run's output: this run replaces it
        shutil.rmtree(files["orbax"])
    checkpoint.save(files["orbax"], int(state.step), state)
    checkpoint.export_pth(
        files["pth"], state, teacher=teacher, epoch=config.epochs, acc=history.ema[-1]
    )
    return files


def _plot(history: History, teacher_accuracy: float | None, path: str, config: DemoConfig) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history.raw) + 1)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(epochs, 100 * np.array(history.raw), "o-", label="raw weights")
    ax.plot(
        epochs,
        100 * np.array(history.ema),
        "s-",
        label=f"EMA ({config.decay_type}, {config.decay})",
    )
    if teacher_accuracy is not None:
        ax.axhline(100 * teacher_accuracy, color="k", ls="--", label="teacher (EMA)")
    title = "jema demo: KD student (width 8)" if config.kd else "jema demo: digits CNN"
    ax.set(xlabel="epoch", ylabel="validation accuracy [%]", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _check_torch_twin(
    pth: str, state: TrainState, x_val: np.ndarray, config: DemoConfig
) -> bool | None:
    try:
        import torch
    except ImportError:
        print(f"PyTorch is not installed: {pth} written, no twin check (pip install 'jema[torch]')")
        return None

    from jema._app.torch_models import TorchDigitsCNN, torch_logits

    width = 8 if config.kd else 16
    twin = TorchDigitsCNN(width)
    ema_net = torch.load(pth, weights_only=True)["ema_net"]
    if config.kd:
        ema_net = {
            k.removeprefix("student."): v for k, v in ema_net.items() if k.startswith("student.")
        }
    twin.load_state_dict(ema_net, strict=True)
    flax_logits = _logits(state.apply_fn, state.ema_variables(), x_val)
    torch_out = torch_logits(twin, x_val)
    agrees = bool(np.array_equal(flax_logits.argmax(-1), torch_out.argmax(-1)))
    print(
        f"PyTorch twin loaded ema_net from {pth}: predictions "
        f"{'equal' if agrees else 'DIFFER from'} the Flax EMA model's on {len(x_val)} images "
        f"(max |logit difference| {np.abs(flax_logits - torch_out).max():.2e})"
    )
    return agrees

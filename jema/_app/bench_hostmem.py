"""(h) The EMA in host memory against the EMA on the accelerator, on a model of >= 1 GB.

Rows of ``jema bench``: the train step (adam) without an EMA, with the EMA on the
accelerator, and with it in pinned host memory at ``every_k_steps`` 1 and 8; each with the
accelerator bytes in use. On a CPU, host and device memory are the same RAM, so the rows say
that the figures need an accelerator instead of printing meaningless numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

import jema
from jema._app.bench import (
    DECAY,
    DECAY_TYPE,
    LEARNING_RATE,
    Row,
    leaf_sizes,
    time_cases,
    train_case,
)

HOSTMEM_PARAMS = 268_435_456  # 1 GiB of float32 weights
GOAL = 1.05  # at k = 8, the offloaded EMA adds at most 5% to the step without an EMA


def hostmem_rows(repeats: int, params: int = HOSTMEM_PARAMS, leaves: int = 64) -> list[Row]:
    """Time the (h) rows, or return them as notes when no accelerator is attached.

    Args:
      repeats: timed runs per row.
      params: float32 weights in the model (1 GiB by default).
      leaves: leaves the weights are split into.

    Returns:
      Four rows: adam alone, + EMA on the accelerator, + EMA in host memory at k = 1, 8.

    Example:
      >>> [row.rate for row in hostmem_rows(1, params=64, leaves=2)][:1]  # on a CPU
      ['needs an accelerator (on a CPU host and device memory are one RAM)']
    """
    names = [
        "(h) adam step, no EMA",
        "(h) adam + EMA on the accelerator",
        "(h) adam + EMA in host memory, k=1",
        "(h) adam + EMA in host memory, k=8",
    ]
    if jax.devices()[0].platform == "cpu":
        note = "needs an accelerator (on a CPU host and device memory are one RAM)"
        return [Row(name, float("nan"), note) for name in names]
    sizes = leaf_sizes(params, leaves)
    optimizers = [
        optax.adam(LEARNING_RATE),
        jema.with_ema(optax.adam(LEARNING_RATE), decay=DECAY, decay_type=DECAY_TYPE),
        *(
            jema.with_ema(
                optax.adam(LEARNING_RATE),
                decay=DECAY,
                decay_type=DECAY_TYPE,
                every_k_steps=k,
                ema_memory_kind="pinned_host",
            )
            for k in (1, 8)
        ),
    ]
    seconds: dict[str, float] = {}
    in_use: dict[str, int] = {}
    for name, optimizer in zip(names, optimizers, strict=True):
        case = train_case(name, optimizer, sizes)
        in_use[name] = _bytes_in_use()
        seconds |= time_cases([case], repeats, warmup=8)  # k = 8: whole cycles
        del case
    return _rows(names, seconds, in_use)


def _rows(names: Sequence[str], seconds: dict[str, float], in_use: dict[str, int]) -> list[Row]:
    base = seconds[names[0]]
    rows = []
    for name in names:
        ratio = seconds[name] / base
        rate = f"{ratio:.3f}x no EMA, {in_use[name] / 2**30:.2f} GiB in use"
        if name.endswith("k=8"):
            rows.append(Row(name, 1e3 * seconds[name], rate, f"<= {GOAL}x", ratio <= GOAL))
        else:
            rows.append(Row(name, 1e3 * seconds[name], rate))
    return rows


def _bytes_in_use() -> int:
    stats: Any = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_in_use", 0))

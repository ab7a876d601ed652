"""Numpy replays of SuperGradients' EMA, written from SEMANTICS.md (float64 decay, float32 math)."""

from __future__ import annotations

import math

import numpy as np


def sg_constant(decay: float, step: int, total_steps: int | None = None) -> float:
    return decay


def sg_threshold(decay: float, step: int, total_steps: int | None = None) -> float:
    return min(decay, (1 + step) / (10 + step))


def sg_exp(decay: float, step: int, total_steps: int, beta: float = 15.0) -> float:
    return decay * (1 - math.exp(-beta * step / total_steps))


def sg_ema_replay(initial: np.ndarray, trajectory: list[np.ndarray], decay_at) -> np.ndarray:
    """SG's ``ema.copy_(ema * d + (1 - d) * p)`` over ``trajectory`` (the weights after each step).

    ``decay_at(step)`` gives the Python-float decay for the 1-based step, as SG's trainer calls it.
    """
    ema = np.array(initial, copy=True)
    for step, weights in enumerate(trajectory, start=1):
        d = decay_at(step)
        ema = ema * d + (1.0 - d) * weights
    return ema

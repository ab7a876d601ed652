"""jema: SuperGradients' exponential moving average of model weights, for JAX/Flax and optax."""

from jema import checkpoint, digits, kd, nnx
from jema._decay import (
    EMA_DECAY_FUNCTIONS,
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    ThresholdDecay,
    constant,
    exp,
    threshold,
)
from jema._state import attach_batch_stats, ema_batch_stats, ema_count, ema_params, find_ema_state
from jema._transform import WeightEmaState, ema_transform, with_ema
from jema.train_state import TrainState, finalize

__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "ConstantDecay",
    "ExpDecay",
    "IDecayFunction",
    "ThresholdDecay",
    "TrainState",
    "WeightEmaState",
    "attach_batch_stats",
    "checkpoint",
    "constant",
    "digits",
    "ema_batch_stats",
    "ema_count",
    "ema_params",
    "ema_transform",
    "exp",
    "finalize",
    "find_ema_state",
    "kd",
    "nnx",
    "threshold",
    "with_ema",
]

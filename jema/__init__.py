"""jema: SuperGradients' exponential moving average of model weights, for JAX/Flax and optax.

``import jema`` loads jax, optax and jema's core only. The Flax integrations load on first
use: ``jema.TrainState`` and ``jema.finalize`` (linen), ``jema.nnx``, ``jema.kd`` and
``jema.checkpoint`` (orbax).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from jema._power import gamma_to_sigma_rel, sigma_rel_to_gamma
from jema._schedules import (
    EMA_DECAY_FUNCTIONS,
    ConstantDecay,
    ExpDecay,
    IDecayFunction,
    ThresholdDecay,
    WarmupDecay,
    constant,
    threshold,
)
from jema._schedules import (
    exp as exp,  # public as jema.exp; left out of __all__
)
from jema._state import (
    PowerEmaState,
    WeightEmaState,
    attach_batch_stats,
    ema_batch_stats,
    ema_count,
    ema_params,
    find_ema_state,
)
from jema._transform import ema_transform, power_ema, with_ema

if TYPE_CHECKING:
    from jema import checkpoint as checkpoint
    from jema import kd as kd
    from jema import nnx as nnx
    from jema import posthoc as posthoc
    from jema.train_state import TrainState as TrainState
    from jema.train_state import finalize as finalize

try:
    __version__ = importlib.metadata.version("jema")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

_LAZY_MODULES = ("checkpoint", "kd", "nnx", "posthoc")
_LAZY_NAMES = {"TrainState": "jema.train_state", "finalize": "jema.train_state"}

# ``from jema import *`` binds the core only, so it loads no flax and hides no common name:
# the lazy integrations (``nnx`` would hide ``flax.nnx``, ``TrainState`` flax's own) and
# ``exp`` (``math.exp``, ``numpy.exp``) are reached as ``jema.<name>``.
__all__ = [
    "EMA_DECAY_FUNCTIONS",
    "ConstantDecay",
    "ExpDecay",
    "IDecayFunction",
    "ThresholdDecay",
    "PowerEmaState",
    "WarmupDecay",
    "WeightEmaState",
    "attach_batch_stats",
    "constant",
    "ema_batch_stats",
    "ema_count",
    "ema_params",
    "ema_transform",
    "find_ema_state",
    "gamma_to_sigma_rel",
    "power_ema",
    "sigma_rel_to_gamma",
    "threshold",
    "with_ema",
]


def __getattr__(name: str) -> Any:
    """Load the Flax integrations on first use (PEP 562)."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f"jema.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jema' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API only (PEP 562): ``__all__``, the names reached as ``jema.<name>`` (the
    lazy integrations, ``exp``) and the module's dunders; no helper or private module."""
    dunders = [name for name in globals() if name.startswith("__") and name.endswith("__")]
    return sorted({*__all__, *_LAZY_MODULES, *_LAZY_NAMES, "exp", *dunders})

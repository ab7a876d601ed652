"""The demo's small CNN for 8x8 digits in linen, with PyTorch's eps, momentum and padding.

Its layer names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc``) map by ``interop``'s default
rule onto the PyTorch twin in ``jema._app.torch_models``, so ``ema_net`` loads there strictly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class DigitsCNN(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 stride 2 -> BN -> ReLU -> global mean -> dense(10).

    Attributes:
      width: channels of the first conv; the second has twice as many.

    Example:
      >>> model = DigitsCNN(width=4)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
        x = nn.relu(_batch_norm("bn1", train)(x))
        x = nn.Conv(2 * self.width, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv2")(x)
        x = nn.relu(_batch_norm("bn2", train)(x))
        return nn.Dense(10, name="fc")(jnp.mean(x, axis=(1, 2)))


def _batch_norm(name: str, train: bool) -> nn.BatchNorm:
    # PyTorch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax's momentum is 1 - that).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)

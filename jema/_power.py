"""The power-function EMA (Karras et al. 2023, EDM2): its width σ_rel, exponent γ, and decay.

At the t-th optimizer step (1-based) an EMA of exponent γ averages the weights seen so far with
the profile ``p(τ) = (γ + 1) / t · (τ / t)**γ`` on ``[0, t]``, through the decay
``β_t = (1 - 1/t)**(γ + 1)``; every k steps the exact decay is ``(1 - k/t)**(γ + 1)``. σ_rel
is the profile's standard deviation in units of t: ``σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jema._checks import check_number

SIGMA_REL_MAX = 1 / math.sqrt(12)  # γ = 0: the uniform average of all steps so far
# γ ≈ 1/σ_rel must stay a float32 number (≤ 3.4e38): the EMA update computes (γ + 1)·log1p(-k/t)
# in float32. The cubic's solver is exact to 1e-16 relative down to about 1e-102 (measured), and
# its σ⁻² overflows float64 below 1e-154.
SIGMA_REL_MIN = 1e-38


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of the power-function EMA whose relative width is ``sigma_rel``.

    γ is the largest real root of ``γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²) = 0``, the only
    positive one for ``0 < σ_rel < 1/√12``; found in float64 and polished by Newton steps.

    Args:
      sigma_rel: the width, in [1e-38, 1/√12 ≈ 0.2887): below 1e-38, γ ≈ 1/σ_rel
        would not fit the float32 EMA update.

    Returns:
      γ, a positive float (exact to about 1e-12 relative).

    Raises:
      ValueError: naming ``sigma_rel`` when it is not a finite number in that range.

    Example:
      >>> round(sigma_rel_to_gamma(0.05), 9)
      16.972198602
    """
    s = check_sigma_rel(sigma_rel)
    inv = 1.0 / (s * s)
    coefficients = [1.0, 7.0, 16.0 - inv, 12.0 - inv]
    roots = np.roots(coefficients)
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r))))
    for _ in range(4):
        value = ((gamma + 7.0) * gamma + 16.0 - inv) * gamma + 12.0 - inv
        slope = (3.0 * gamma + 14.0) * gamma + 16.0 - inv
        gamma -= value / slope
    return gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width σ_rel of the power-function EMA of exponent ``gamma``.

    Args:
      gamma: the exponent, a positive finite number.

    Returns:
      ``sqrt((γ + 1) / ((γ + 2)² (γ + 3)))``, in (0, 1/√12).

    Raises:
      ValueError: naming ``gamma`` when it is not a positive finite number.

    Example:
      >>> round(gamma_to_sigma_rel(6.937203937601809), 12)
      0.1
    """
    g = check_number(gamma, "gamma", "be a positive finite number", low=0.0)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def width_key(sigma_rel: float) -> str:
    """The name a tracked width goes by in states and snapshots: ``repr`` of the float.

    Args:
      sigma_rel: the width.

    Returns:
      A string that ``float()`` turns back into the same width, exactly.

    Example:
      >>> width_key(0.05), float(width_key(0.05)) == 0.05
      ('0.05', True)
    """
    return repr(float(sigma_rel))


def power_weights(
    step: Any, gammas: tuple[float, ...], every_k_steps: int | jax.Array = 1
) -> list[Any]:
    """``(β, 1 - β)`` of each exponent at the 1-based ``step``, formed without cancellation.

    ``β = (1 - k/t)**(γ + 1)`` through ``exp``/``log1p``, ``1 - β`` through ``expm1``; at
    ``t = k`` (the first averaging step) β is 0 and the EMA becomes a copy.

    Args:
      step: the 1-based optimizer step t (may be traced), a multiple of ``every_k_steps``.
      gammas: the exponents.
      every_k_steps: k, the steps between averagings.

    Returns:
      One ``(β, 1 - β)`` pair of float32 scalars per exponent (float64 with x64 enabled).

    Example:
      >>> [round(float(w), 6) for w in power_weights(4, (1.0,))[0]]
      [0.5625, 0.4375]
    """
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    log_keep = jnp.log1p(-every_k_steps / jnp.asarray(step, dtype))
    pairs = []
    for gamma in gammas:
        exponent = (gamma + 1.0) * log_keep
        pairs.append((jnp.exp(exponent), -jnp.expm1(exponent)))
    return pairs


def check_sigma_rel(sigma_rel: Any, name: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, once it is a width a power-function EMA can have.

    Args:
      sigma_rel: the relative width σ_rel.
      name: what the caller calls it, for the message (e.g. ``"sigma_rels[1]"``).

    Returns:
      The width as a float.

    Raises:
      ValueError, TypeError: naming ``name`` when it is not a number in [1e-38, 1/√12).

    Example:
      >>> check_sigma_rel(0.05)
      0.05
    """
    return check_number(
        sigma_rel,
        name,
        f"be a number in [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}) (1/sqrt(12), the uniform "
        "average)",
        low=SIGMA_REL_MIN,
        high=SIGMA_REL_MAX,
        closed="low",
    )

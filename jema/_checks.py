"""Checks shared by the library: the one test of whether a dtype is floating.

numpy's ``np.issubdtype(bfloat16, np.floating)`` is False for ml_dtypes' bfloat16 and float8,
so a floating test written with numpy takes the wrong branch silently for them; every floating
test in jema goes through :func:`is_floating`, which knows them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype, ml_dtypes' bfloat16 and float8 included.

    Args:
      dtype: a dtype, or anything ``jnp.dtype`` takes.

    Returns:
      True for float16/32/64, bfloat16 and the float8 dtypes; False otherwise (complex too).

    Example:
      >>> import ml_dtypes, numpy as np
      >>> is_floating(ml_dtypes.bfloat16), np.issubdtype(ml_dtypes.bfloat16, np.floating)
      (True, False)
      >>> is_floating("int32"), is_floating("complex64")
      (False, False)
    """
    return bool(jnp.issubdtype(dtype, jnp.floating))

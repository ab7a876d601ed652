"""scikit-learn's 8x8 handwritten digits, ready for Flax: the built-in dataset of the demo."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def load_digits_splits(
    val_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1,797 digits (shipped inside scikit-learn, no download), shuffled and split.

    Args:
      val_fraction: share of the images held out for validation, inside (0, 1).
      seed: seed of the shuffle.

    Returns:
      ``(x_train, y_train, x_val, y_val)``: images as float32 NHWC ``(n, 8, 8, 1)`` scaled to
      [0, 1], labels as int32 in 0..9.

    Raises:
      ValueError: when ``val_fraction`` is not inside (0, 1).
      ImportError: when scikit-learn is missing (``pip install 'jema[demo]'``).

    Example:
      >>> x_train, y_train, x_val, y_val = load_digits_splits()
      >>> x_train.shape, x_val.shape
      ((1348, 8, 8, 1), (449, 8, 8, 1))
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be inside (0, 1); got {val_fraction!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val]


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled full batches (the remainder is dropped, as ``drop_last=True``).

    Args:
      x: inputs, first axis the examples.
      y: labels, same length as ``x``.
      batch_size: examples per batch, between 1 and ``len(x)``.
      rng: numpy generator that shuffles.

    Yields:
      ``(x_batch, y_batch)`` pairs.

    Raises:
      ValueError: when ``batch_size`` is out of range or ``x`` and ``y`` differ in length.

    Example:
      >>> xs = np.arange(10)
      >>> [len(b) for b, _ in batches(xs, xs, 4, np.random.default_rng(0))]
      [4, 4]
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if not 1 <= batch_size <= len(x):
        raise ValueError(f"batch_size must be between 1 and {len(x)}; got {batch_size!r}")
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]

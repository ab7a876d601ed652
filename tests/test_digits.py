"""The built-in dataset: a deterministic, disjoint split and full shuffled batches."""

import numpy as np
import pytest

from jema._app.digits import batches, load_digits_splits


def test_split_is_disjoint_deterministic_and_scaled():
    x_train, y_train, x_val, y_val = load_digits_splits(val_fraction=0.2, seed=3)
    again = load_digits_splits(val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(x_val, again[2])
    assert len(x_train) + len(x_val) == 1797 and len(x_val) == 359
    assert x_train.dtype == np.float32 and x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert set(np.unique(np.concatenate([y_train, y_val]))) == set(range(10))
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_val) < 5  # the dataset has a few duplicates


def test_batches_cover_each_example_at_most_once():
    x = np.arange(23)
    seen = np.concatenate([xb for xb, _ in batches(x, x, 5, np.random.default_rng(1))])
    assert len(seen) == 20 and len(np.unique(seen)) == 20


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_bad_val_fraction(fraction):
    with pytest.raises(
        ValueError, match=rf"val_fraction must be inside \(0, 1\); got {fraction!r}"
    ):
        load_digits_splits(val_fraction=fraction)


def test_bad_batches():
    with pytest.raises(ValueError, match="batch_size must be between 1 and 3; got 4"):
        next(batches(np.zeros(3), np.zeros(3), 4, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="x and y differ in length: 3 vs 2"):
        next(batches(np.zeros(3), np.zeros(2), 1, np.random.default_rng(0)))

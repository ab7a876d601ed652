"""Damaged and malformed checkpoint files: ``load_checkpoint`` and ``inspect_checkpoint`` end in
a ``ValueError`` or ``OSError`` naming the file, never in a raw library exception. No PyTorch
needed: the seeds and kept files were written by it once.

``tests/data/interop_bad/seeds`` holds three valid files (zip and legacy ``torch.save``,
safetensors); the fuzz test mutates them with a fixed seed. Every input that once escaped as
another exception is kept in ``tests/data/interop_bad`` and loaded by its own test.
"""

from __future__ import annotations

import pathlib
import random

import jax
import numpy as np
import pytest

import interop

DATA = pathlib.Path(__file__).parent / "data" / "interop_bad"
SEEDS = sorted((DATA / "seeds").iterdir())
REGRESSIONS = sorted(p for p in DATA.iterdir() if p.is_file())
CASES_PER_SEED = 400


def _abstract(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, np.float32)


TEMPLATE = {
    "params": {
        "fc": {"kernel": _abstract(2, 2), "bias": _abstract(2)},
        "bn": {"scale": _abstract(2), "bias": _abstract(2)},
    },
    "batch_stats": {"bn": {"mean": _abstract(2), "var": _abstract(2)}},
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage: cut, flip a bit, overwrite, drop or repeat a few bytes."""
    b = bytearray(data)
    at = rng.randrange(len(b))
    kind = rng.choice(["cut", "flip", "byte", "drop", "repeat"])
    if kind == "cut":
        del b[at:]
    elif kind == "flip":
        b[at] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[at] = rng.randrange(256)
    elif kind == "drop":
        del b[at : at + rng.randrange(1, 9)]
    else:
        b[at:at] = b[at : at + rng.randrange(1, 9)]
    return bytes(b)


def outcome(path: pathlib.Path) -> str | None:
    """None when loading and inspecting succeed or fail as they should, else what escaped."""
    for read in (
        lambda: interop.load_checkpoint(path, TEMPLATE, strict=False),
        lambda: interop.inspect_checkpoint(path),
    ):
        try:
            read()
        except (ValueError, OSError) as e:
            if str(path) not in str(e):
                return f"{type(e).__name__} without the file name: {e}"
        except Exception as e:  # what the test is for: nothing else may escape
            return f"{type(e).__name__}: {e}"
    return None


def test_the_seeds_load() -> None:
    assert [p.name for p in SEEDS] == [
        "sections.pth",
        "sections.safetensors",
        "sections_legacy.pth",
    ]
    for path in SEEDS:
        value = interop.load_checkpoint(path, TEMPLATE)
        assert value["batch_stats"]["bn"]["var"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_mutated_files_fail_with_the_file_name(seed, tmp_path) -> None:
    rng = random.Random(f"interop-fuzz-{seed.name}")
    data = seed.read_bytes()
    path = tmp_path / seed.name
    escaped = {}
    for case in range(CASES_PER_SEED):
        path.write_bytes(mutate(data, rng))
        if (what := outcome(path)) is not None:
            escaped.setdefault(what.split(":")[0], (case, what))
    assert escaped == {}


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_every_cut_near_the_end_fails_with_the_file_name(seed, tmp_path) -> None:
    """The end holds a zip's directory and a pickle's STOP; cutting there once gave
    ``OSError: [Errno 22] Invalid argument`` with no file name."""
    data = seed.read_bytes()
    path = tmp_path / seed.name
    for size in range(len(data) - 64, len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="not a readable") as e:
            interop.load_checkpoint(path, TEMPLATE)
        assert str(e.value).startswith(str(path))


# What each kept file once raised, and what it says now (after the file name).
KEPT = {
    "legacy_attribute.pth": ("AttributeError", "storage key '94380740853744' is unknown"),
    "legacy_cut_in_a_global.pth": ("'needs globals torch._utils._reb'", "overlong GLOBAL name"),
    "legacy_one_byte.pth": ("IndexError", "truncated: 1 bytes claimed, 0 left"),
    "legacy_rebuild_args.pth": ("TypeError", "_rebuild_tensor_v2: expected 6 or 7 arguments"),
    "legacy_storage_key.pth": ("AssertionError", "persistent id 42: only storages are allowed"),
    "legacy_struct.pth": ("struct.error", "truncated: 2 bytes claimed, 1 left"),
    "zip_attribute.pth": ("AttributeError", "expected a storage type, key and size"),
    "zip_cut_last_byte.pth": ("OSError [Errno 22] without a file name", "damaged zip archive"),
    "zip_index.pth": ("IndexError", "corrupt pickle at byte 34"),
    "zip_not_tensors.pth": ("TypeError", "'ema_net' must map str names to arrays or tensors"),
    "zip_operand.pth": ("UnpicklingError", "APPEND to a dict, not a list"),
}


def test_every_kept_file_is_listed() -> None:
    assert [p.name for p in REGRESSIONS] == sorted(KEPT)


@pytest.mark.parametrize("name", sorted(KEPT))
def test_kept_bad_files_fail_with_the_file_name(name) -> None:
    path = DATA / name
    for read in (
        lambda: interop.load_checkpoint(path, TEMPLATE),
        lambda: interop.inspect_checkpoint(path),
    ):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value).startswith(str(path)) and KEPT[name][1] in str(e.value)
        assert "needs globals" not in str(e.value)


ONES, ZEROS = np.ones(2, np.float32), np.zeros(2, np.float32)
GOOD = {"fc.weight": np.ones((2, 2), np.float32), "fc.bias": ONES}
BN = {"bn.weight": ONES, "bn.bias": ZEROS, "bn.running_mean": ZEROS, "bn.running_var": ONES}


def _net(**replaced: object) -> dict:
    return {"net": {**GOOD, **BN, **replaced}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"net": {0: ZEROS, **GOOD}},
            "'net' must map str names to arrays or tensors; got key 0: int",
        ),
        (
            {0: ZEROS, **GOOD},
            "'state_dict' must map str names to arrays or tensors; got key 0: int",
        ),
        (
            _net(**{"fc.extra": 3}),
            "'net' must map str names to arrays or tensors; got 'fc.extra': int",
        ),
        (
            {"net": {**GOOD, "sub": {"a": ZEROS}}},
            "'net' must map str names to arrays or tensors; got 'sub': dict",
        ),
    ],
)
def test_sections_must_map_names_to_tensors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.pth"
    interop.write_checkpoint(path, content)
    for read in (interop.inspect_checkpoint, lambda p: interop.load_checkpoint(p, TEMPLATE)):
        with pytest.raises(ValueError) as e:
            read(path)
        assert str(e.value) == f"{path}: {message}"

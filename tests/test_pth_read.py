"""``interop.read_checkpoint`` of ``torch.save`` files: what ``torch.load(weights_only=True)``
returns, with numpy arrays for tensors, to the bit, the stride and the container type.

With torch, the corpus of ``tests/pth_corpus.py`` and random state_dicts are checked against
``torch.load``; without it, the committed fixtures of ``tests/data/pth`` are checked against the
seeded recipes they were written from.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import interop
from interop._files import save_safetensors
from tests import pth_corpus
from tests.pth_corpus import (
    DTYPES,
    FIXTURE_DIR,
    FIXTURES,
    NEW_DTYPES,
    STORAGES,
    assert_same,
    assert_same_sharing,
    from_torch,
    random_array,
    state_dicts,
    to_torch,
    write_big_endian,
)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def corpus(torch, tmp_path_factory) -> dict[str, pathlib.Path]:
    return pth_corpus.build_corpus(tmp_path_factory.mktemp("corpus"))


CORPUS = (
    "dtypes",
    "views",
    "layouts",
    "parameters",
    "module",
    "module_channels_last",
    "containers",
    "many",
    "sg_sgd",
    "sg_adam",
    "legacy",
    "renamed",
    "deflated",
    "big_endian",
)


def test_the_corpus_is_what_the_tests_read(corpus) -> None:
    assert tuple(corpus) == CORPUS


@pytest.mark.parametrize("name", CORPUS)
def test_a_corpus_file_reads_as_torch_load_reads_it(torch, corpus, name) -> None:
    got = interop.read_checkpoint(corpus[name])
    want = from_torch(torch.load(corpus[name], weights_only=True))
    assert_same(got, want, name)
    assert_same_sharing(got, want)


def test_the_corpus_has_what_it_is_for(torch, corpus) -> None:
    """The oracle's side of the claims: each file holds what its test is about."""
    with zipfile.ZipFile(corpus["renamed"]) as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"original_name"}
    with zipfile.ZipFile(corpus["deflated"]) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    assert not zipfile.is_zipfile(corpus["legacy"])
    views = torch.load(corpus["views"], weights_only=True)
    assert views["slice"].untyped_storage().data_ptr() == views["base"].untyped_storage().data_ptr()
    layouts = torch.load(corpus["layouts"], weights_only=True)
    assert layouts["channels_last"].stride() == (27, 1, 9, 3)
    assert layouts["expanded"].stride() == (1, 0)
    sgd = torch.load(corpus["sg_sgd"], weights_only=True)
    assert set(sgd["optimizer_state_dict"]["state"][0]) == {"momentum_buffer"}
    assert type(sgd["acc"]) is float and hasattr(sgd["net"], "_metadata")
    with zipfile.ZipFile(corpus["many"]) as z:  # more than 256 memo entries: LONG_BINPUT
        assert b"r" in z.read("many/data.pkl")


def test_a_parameter_reads_as_an_array(torch, corpus) -> None:
    got = interop.read_checkpoint(corpus["parameters"])
    want = torch.load(corpus["parameters"], weights_only=True)
    assert type(want["p"]) is torch.nn.Parameter
    assert isinstance(got["p"], np.ndarray)
    assert got["p"].tobytes() == want["p"].detach().numpy().tobytes()


@pytest.mark.parametrize("name", ["views", "legacy", "deflated", "big_endian"])
def test_arrays_are_read_only(corpus, name) -> None:
    for array in pth_corpus.arrays(interop.read_checkpoint(corpus[name])):
        assert not array.flags.writeable
        if array.size:
            with pytest.raises(ValueError, match="read-only"):
                array.flat[0] = array.flat[0]


def test_big_endian_files_read_as_torch_reads_them(torch, corpus) -> None:
    """The corpus file swaps every classic dtype's bytes; torch swaps them back."""
    want = torch.load(corpus["big_endian"], weights_only=True)
    for name in STORAGES:
        assert want[name].dtype == getattr(torch, name)
    got = interop.read_checkpoint(corpus["big_endian"])
    for name, array in got.items():
        assert array.dtype == DTYPES[name] and array.dtype.isnative, name


def test_conjugate_and_negative_views_read_as_their_values(torch, tmp_path) -> None:
    """torch keeps a lazy conj/neg bit (tensor metadata); numpy has none: the values."""
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x = torch.tensor([1.0, -2.0, 0.0])
    path = tmp_path / "lazy.pth"
    torch.save({"z": z, "conj": z.conj(), "neg": torch._neg_view(x)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["conj"].is_conj() and loaded["neg"].is_neg()
    want = {k: v.resolve_conj().resolve_neg().numpy() for k, v in loaded.items()}
    assert_same(interop.read_checkpoint(path), want, strides=False)


@pytest.mark.parametrize("name", NEW_DTYPES)
def test_big_endian_new_dtypes_wider_than_a_byte_are_refused(torch, tmp_path, name) -> None:
    """uint16/32/64 and float8 in a big-endian file: torch 2.13 swaps them per byte (their
    storage is UntypedStorage), i.e. not at all, so it reads other values than the writing
    machine held. The reader refuses those rather than guess; float8 (one byte) reads as torch
    reads it."""
    values = {name: random_array(np.random.default_rng(5), DTYPES[name], (5,))}
    path = tmp_path / "big.pth"
    write_big_endian(to_torch(values), path)
    theirs = from_torch(torch.load(path, weights_only=True))
    swapped = values[name].byteswap() if values[name].itemsize > 1 else values[name]
    assert theirs[name].tobytes() == swapped.tobytes()
    if values[name].itemsize == 1:
        assert_same(interop.read_checkpoint(path), theirs)
    else:
        with pytest.raises(ValueError, match=f"{path}.*{name}.*big-endian"):
            interop.read_checkpoint(path)


@given(state_dict=state_dicts(), legacy=st.booleans())
def test_torch_save_reads_back_bit_exact(torch, tmp_path_factory, state_dict, legacy) -> None:
    if legacy:  # the legacy format has no storage type for the new dtypes
        state_dict = {k: v for k, v in state_dict.items() if v.dtype.name not in NEW_DTYPES}
    path = tmp_path_factory.mktemp("random") / "sd.pth"
    torch.save(to_torch(state_dict), path, _use_new_zipfile_serialization=not legacy)
    got = interop.read_checkpoint(path)
    want = from_torch(torch.load(path, weights_only=True))
    assert_same(got, want)
    assert_same(got, state_dict, strides=False)
    assert_same_sharing(got, want)
    for a, b in pth_corpus.ties(state_dict):
        assert got[a].size == 0 or np.shares_memory(got[a], got[b]), (a, b)


# ---- the committed fixtures: no torch needed ----


def test_the_fixtures_are_small_and_all_known() -> None:
    files = sorted(FIXTURE_DIR.iterdir())
    assert [p.name for p in files] == sorted(FIXTURES)
    assert sum(p.stat().st_size for p in files) < 20_000


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_a_fixture_reads_as_its_recipe(name) -> None:
    got = interop.read_checkpoint(FIXTURE_DIR / name)
    want = FIXTURES[name]()
    assert_same(got, want, name)
    assert_same_sharing(got, want)


def test_fixture_views_share_one_buffer() -> None:
    """The recipes' ties and views, as the fixtures must keep them."""
    legacy = interop.read_checkpoint(FIXTURE_DIR / "legacy.pth")
    assert np.shares_memory(legacy["w"], legacy["tied"])
    assert np.shares_memory(legacy["w"], legacy["tail"])
    layouts = interop.read_checkpoint(FIXTURE_DIR / "layouts.pth")
    assert np.shares_memory(layouts["matrix"], layouts["transposed"])
    assert layouts["expanded"].strides == (0, 4)
    assert layouts["scalar"].shape == () and layouts["empty"].shape == (3, 0)
    new = interop.read_checkpoint(FIXTURE_DIR / "new_dtypes.pth")
    assert np.shares_memory(new["uint16"], new["uint16_view"])


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_a_fixture_is_what_torch_writes_from_its_recipe(torch, tmp_path, name) -> None:
    committed = torch.load(FIXTURE_DIR / name, weights_only=True)
    assert_same(from_torch(committed), FIXTURES[name]())
    pth_corpus.write_fixture(name, tmp_path / name)
    fresh = from_torch(torch.load(tmp_path / name, weights_only=True))
    assert_same(fresh, from_torch(committed))
    assert_same_sharing(fresh, from_torch(committed))
    if name != "legacy.pth":
        with zipfile.ZipFile(FIXTURE_DIR / name) as old, zipfile.ZipFile(tmp_path / name) as new:
            assert old.namelist() == new.namelist()


# ---- what else read_checkpoint promises ----

NEVER_TORCH = """
import sys
import interop
for path in sys.argv[1:]:
    interop.read_checkpoint(path)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""


def test_reading_never_imports_torch() -> None:
    """Even where torch is installed (leg 1): one code path."""
    paths = [str(FIXTURE_DIR / name) for name in sorted(FIXTURES)]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NEVER_TORCH), *paths],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)},
        timeout=120,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_safetensors_files_read_as_sections(tmp_path) -> None:
    path = tmp_path / "ckpt.safetensors"
    w = np.arange(3, dtype=np.float32)
    save_safetensors(path, {"net.w": w, "ema_net.w": w + 1}, {})
    got = interop.read_checkpoint(path)
    assert_same(got, {"net": {"w": w}, "ema_net": {"w": w + 1}})


@pytest.mark.parametrize("module", [b"numpy._core.multiarray", b"numpy.core.multiarray"])
def test_numpy_scalars_in_the_metadata_read_as_their_values(tmp_path, module) -> None:
    """SG writes ``acc`` as a numpy scalar, which weights_only refuses; the reader decodes it as
    data (numpy 2 names it ``numpy._core``, numpy 1 ``numpy.core``)."""
    values = {"acc": np.float32(0.75), "epoch": np.int64(3), "loss": np.float64(-1.5)}
    pickled = pickle.dumps(values, protocol=2).replace(b"numpy._core.multiarray", module)
    path = pth_corpus.crafted_pth(tmp_path / "acc.pth", None, pickled=pickled)
    got = interop.read_checkpoint(path)
    assert list(got) == list(values)
    for key, value in values.items():
        assert type(got[key]) is type(value) and got[key].tobytes() == value.tobytes(), key

"""Hugging Face folders without PyTorch: what ``save_checkpoint`` writes reads back bit-exact,
every bad folder is refused naming the folder and the file, a folder is replaced whole or not
at all, and a state sharded over 8 CPU devices saves as the unsharded one does, one leaf at a
time (run as ``python tests/test_interop_hf_folders.py`` in a child with 8 host devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import jax
import numpy as np
import pytest

import interop
import interop._checkpoint
import interop._files
import interop._hf
from interop._files import _temp_prefix
from interop._pth import write_pth
from jema._app.cli import main

RNG = np.random.default_rng(0)
NET = {
    "params": {
        "embed": {"embedding": RNG.standard_normal((50, 8)).astype(np.float32)},
        "fc": {
            "kernel": RNG.standard_normal((8, 30)).astype(np.float32),
            "bias": RNG.standard_normal(30).astype(np.float32),
        },
        "out": {"kernel": RNG.standard_normal((30, 4)).astype(np.float32)},
    }
}
EMA = jax.tree.map(lambda a: a + 1, NET)
TORCH = {  # the PyTorch names and layouts of NET
    "embed.weight": NET["params"]["embed"]["embedding"],
    "fc.weight": NET["params"]["fc"]["kernel"].T,
    "fc.bias": NET["params"]["fc"]["bias"],
    "out.weight": NET["params"]["out"]["kernel"].T,
}


def _same(got: dict, want: dict, ordered: bool = True) -> bool:
    """Same keys (in order, unless not ``ordered``: a safetensors file sorts them), dtypes and
    bits."""
    keys = (list(got), list(want)) if ordered else (sorted(got), sorted(want))
    return keys[0] == keys[1] and all(
        np.asarray(got[k]).dtype == want[k].dtype and np.array_equal(np.asarray(got[k]), want[k])
        for k in want
    )


def _tree_same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def _save(folder, **options) -> str:
    interop.save_checkpoint(str(folder) + os.sep, net=NET, **options)
    return str(folder)


@pytest.mark.parametrize("size", ["1KB", "5GB"], ids=["sharded", "single"])
@pytest.mark.parametrize("format", ["safetensors", "pth"])
def test_a_saved_folder_reads_back_bit_exact(tmp_path, format, size) -> None:
    folder = _save(tmp_path / "model", format=format, max_shard_size=size)
    files = sorted(os.listdir(folder))
    stem, suffix = (
        ("model", ".safetensors") if format == "safetensors" else ("pytorch_model", ".bin")
    )
    if size == "5GB":
        assert files == [stem + suffix]
    else:  # 1000 bytes a shard: embed (1600 bytes) alone, fc.weight, fc.bias + out.weight
        names = [f"{stem}-{i:05d}-of-00003{suffix}" for i in (1, 2, 3)]
        assert files == [*names, f"{stem}{suffix}.index.json"]
        with open(os.path.join(folder, files[-1])) as f:
            index = json.load(f)
        assert index == {
            "metadata": {"total_size": 4 * (400 + 240 + 30 + 120)},
            "weight_map": dict(zip(TORCH, [names[0], names[1], names[2], names[2]], strict=True)),
        }
    assert _same(interop.read_checkpoint(folder), TORCH, ordered=format == "pth")
    assert _tree_same(interop.load_checkpoint(folder, NET), NET)


def test_with_ema_net_a_folder_holds_both_sections(tmp_path) -> None:
    for format in ("safetensors", "pth"):
        folder = str(tmp_path / format) + os.sep
        interop.save_checkpoint(folder, net=NET, ema_net=EMA, format=format, max_shard_size=2000)
        keys = interop.read_checkpoint(folder)
        assert list(keys) == ["net", "ema_net"] and _same(keys["net"], TORCH, ordered=False)
        assert _tree_same(interop.load_checkpoint(folder, NET), EMA)
        assert _tree_same(interop.load_checkpoint(folder, NET, which="net"), NET)


def test_tied_keys_are_stored_once_in_safetensors_and_shared_in_pth(tmp_path) -> None:
    embed = NET["params"]["embed"]["embedding"]
    template = {"embed.weight": embed, "head.weight": embed}  # one tensor under two keys
    tied = {"params": {"embed": {"embedding": embed + 1}}}
    for format in ("safetensors", "pth"):
        folder = str(tmp_path / format) + os.sep
        interop.save_checkpoint(folder, net=tied, torch_template=template, format=format)
        got = interop.read_checkpoint(folder)
        if format == "safetensors":
            assert list(got) == ["embed.weight"]
        else:
            assert list(got) == ["embed.weight", "head.weight"]
            assert np.shares_memory(got["embed.weight"], got["head.weight"])
        np.testing.assert_array_equal(got["embed.weight"], embed + 1)


def _damaged(tmp_path, damage) -> tuple[str, str]:
    folder = _save(tmp_path / "model", max_shard_size="1KB")
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        content = json.load(f)
    return folder, damage(folder, index, content)


def _write_index(index: str, content) -> None:
    with open(index, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def _missing_shard(folder, index, content) -> str:
    os.unlink(os.path.join(folder, "model-00002-of-00003.safetensors"))
    return "model-00002-of-00003.safetensors, which is missing"


def _key_elsewhere(folder, index, content) -> str:
    content["weight_map"]["fc.bias"] = "model-00001-of-00003.safetensors"
    _write_index(index, content)
    return "maps 'fc.bias' to model-00001-of-00003.safetensors, which lacks it"


def _not_json(folder, index, content) -> str:
    _write_index(index, "{not json")
    return "model.safetensors.index.json is not a JSON index"


def _no_weight_map(folder, index, content) -> str:
    _write_index(index, {"metadata": {}, "weights": content["weight_map"]})
    return "model.safetensors.index.json must be a JSON object with a 'weight_map'"


def _escaping(folder, index, content) -> str:
    content["weight_map"]["fc.bias"] = "../model-00003-of-00003.safetensors"
    _write_index(index, content)
    return "must map keys to file names in the folder; got 'fc.bias'"


def _not_a_state_dict(folder, index, content) -> str:
    write_pth(os.path.join(folder, "model-00003-of-00003.safetensors"), [1, 2])
    return "model-00003-of-00003.safetensors must hold a state_dict"


@pytest.mark.parametrize(
    "damage",
    [_missing_shard, _key_elsewhere, _not_json, _no_weight_map, _escaping, _not_a_state_dict],
)
def test_every_bad_folder_is_refused_naming_the_folder_and_the_file(tmp_path, damage) -> None:
    folder, message = _damaged(tmp_path, damage)
    for path in (folder, os.path.join(folder, "model.safetensors.index.json")):
        with pytest.raises(ValueError) as raised:
            interop.load_checkpoint(path, NET)
        assert str(raised.value).startswith(f"{folder}: ") and message in str(raised.value)


def test_a_folder_without_weights_is_refused_listing_what_it_holds(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as raised:
        interop.load_checkpoint(tmp_path, NET)
    assert str(raised.value) == (
        f"{tmp_path}: a Hugging Face folder holds one of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json; this "
        "one has none (it holds config.json)"
    )


def test_paths_that_are_not_clearly_a_file_or_a_folder_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="is neither a file name .* nor a folder"):
        interop.save_checkpoint(tmp_path / "model", net=NET)
    interop.save_checkpoint(tmp_path / "model_best.pth.tar", net=NET)  # torch.save takes any name
    assert set(interop.read_checkpoint(tmp_path / "model_best.pth.tar")) == {"net"}
    os.remove(tmp_path / "model_best.pth.tar")
    with pytest.raises(ValueError, match="is a file: format=, max_shard_size= and overwrite="):
        interop.save_checkpoint(tmp_path / "ckpt.pth", net=NET, max_shard_size="1KB")
    with pytest.raises(ValueError, match=r"holds tensors only; got the entries \['epoch'\]"):
        interop.save_checkpoint(f"{tmp_path}/model/", net=NET, epoch=3)
    with pytest.raises(ValueError, match="format must be 'safetensors' or 'pth'; got 'npz'"):
        interop.save_checkpoint(f"{tmp_path}/model/", net=NET, format="npz")
    assert os.listdir(tmp_path) == []


def test_an_empty_folder_is_written_and_a_file_is_never_taken_for_one(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty")  # nothing to lose: no overwrite=True needed
    assert _same(interop.read_checkpoint(tmp_path / "empty"), TORCH, ordered=False)
    (tmp_path / "f.pth").write_bytes(b"mine")
    with pytest.raises(NotADirectoryError, match="Not a folder"):
        _save(tmp_path / "f.pth")  # "f.pth/": refused before any conversion or write
    assert (tmp_path / "f.pth").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["empty", "f.pth"]


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path) -> None:
    folder = _save(tmp_path / "model", max_shard_size="1KB")
    before = {name: (tmp_path / "model" / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _save(folder)
    _save(folder, overwrite=True)
    assert os.listdir(folder) == ["model.safetensors"]  # the old shards and index are gone
    assert _same(interop.read_checkpoint(folder), TORCH, ordered=False)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds config.json, which save_checkpoint does not"):
        _save(folder, overwrite=True)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert before  # the refusals above left the folder as they found it


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two_renames"])
def test_a_save_that_fails_half_way_leaves_the_old_folder(tmp_path, monkeypatch, swap) -> None:
    folder = _save(tmp_path / "model", max_shard_size="1KB")
    before = {name: (tmp_path / "model" / name).read_bytes() for name in os.listdir(folder)}
    if not swap:
        monkeypatch.setattr(interop._files, "_exchange", lambda a, b: False)
    write = interop._hf.save_safetensors
    calls = []

    def dies_on_the_second_shard(path, arrays, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill between two shards
        write(path, arrays, metadata)

    monkeypatch.setattr(interop._hf, "save_safetensors", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _save(folder, overwrite=True, max_shard_size="1KB")
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no half folder, visible or hidden
    assert {name: (tmp_path / "model" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(folder)) == sorted(before)
    monkeypatch.setattr(interop._hf, "save_safetensors", write)
    _save(folder, overwrite=True)  # and the next save replaces it, either way
    assert os.listdir(folder) == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["model"]


def test_what_a_killed_save_left_is_removed_by_the_next(tmp_path) -> None:
    stale = tmp_path / f"{_temp_prefix('model')}0123456789abcdef.tmp"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    _save(tmp_path / "model")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_inspect_and_the_cli_take_folders(tmp_path, capsys) -> None:
    folder = str(tmp_path / "model")
    interop.save_checkpoint(folder + os.sep, net=NET, ema_net=EMA, max_shard_size="1KB")
    report = interop.inspect_checkpoint(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    lines = report.splitlines()
    assert lines[0] == f"{folder} (Hugging Face folder: 7 files, {size:,} bytes)"
    assert lines[1:3] == [
        "net: 4 tensors, 790 parameters, dtypes float32 x4",
        "ema_net: 4 tensors, 790 parameters, dtypes float32 x4",
    ]
    assert "format: 'pt'" in lines
    assert main(["inspect", folder]) == 0
    assert capsys.readouterr().out == report + "\n"
    assert main(["inspect", str(tmp_path)]) == 1
    assert "a Hugging Face folder holds one of" in capsys.readouterr().err


def test_a_state_sharded_over_8_devices_saves_as_the_unsharded_one_leaf_by_leaf() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["devices"] == [8, 8, 8, 8, 8]  # every leaf over all 8 devices
    for format in ("safetensors", "pth"):
        assert len(facts[format]["files"]) == 4  # 3 shards and the index
        assert facts[format]["same_content"] is True
    assert facts["gathers"] == 10  # 5 leaves, once per format
    assert facts["alive_at_next_gather"] == 0  # each large gathered leaf had left memory


SPECS = {  # Dense kernels are transposed on the way: shards on either or both axes
    ("kernel_in", "kernel"): ("a", None),
    ("kernel_out", "kernel"): (None, ("a", "b")),
    ("kernel_both", "kernel"): ("a", "b"),
    ("small", "kernel"): (None, ("a", "b")),
    ("small", "bias"): (("a", "b"),),
}


def _sharded_facts() -> dict:
    """Run in the child: a sharded state and its numpy twin, each saved to a folder."""
    import tempfile

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    big = np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32)
    values = [big, big + 1, big + 2, big[:8] - 1, np.arange(1024, dtype=np.float32)]
    host: dict = {"params": {}}
    sharded: dict = {"params": {}}
    for (module, leaf), value in zip(SPECS, values, strict=True):
        put = jax.device_put(value, NamedSharding(mesh, P(*SPECS[module, leaf])))
        host["params"].setdefault(module, {})[leaf] = value
        sharded["params"].setdefault(module, {})[leaf] = put
    gathered: list[weakref.ref] = []
    alive = []
    gather = interop._checkpoint._gather

    def counting(value):
        alive.extend(ref for ref in gathered if ref() is not None and ref().nbytes >= 1 << 20)
        out = gather(value)
        gathered.append(weakref.ref(out))
        return out

    interop._checkpoint._gather = counting
    facts: dict = {
        "devices": [len(a.sharding.device_set) for a in jax.tree.leaves(sharded)],
    }
    with tempfile.TemporaryDirectory() as folder:
        for format in ("safetensors", "pth"):
            ours, want = (os.path.join(folder, f"{format}-{kind}/") for kind in ("sharded", "host"))
            interop.save_checkpoint(ours, net=sharded, format=format, max_shard_size="3MB")
            interop.save_checkpoint(want, net=host, format=format, max_shard_size="3MB")
            files = sorted(os.listdir(ours))
            same = files == sorted(os.listdir(want)) and all(
                _same_file(os.path.join(ours, f), os.path.join(want, f)) for f in files
            )
            facts[format] = {"files": files, "same_content": same}
    facts["gathers"] = len(gathered)
    facts["alive_at_next_gather"] = len(alive)
    return facts


def _same_file(a: str, b: str) -> bool:
    """Same bytes for an index, same keys in order, dtypes, strides and bits for a shard (a
    ``.pth`` holds a random serialization id)."""
    if a.endswith(".json"):
        with open(a, "rb") as f, open(b, "rb") as g:
            return f.read() == g.read()
    x, y = interop.read_checkpoint(a), interop.read_checkpoint(b)
    return _same(x, y) and all(x[k].strides == y[k].strides for k in x)


if __name__ == "__main__":
    print(json.dumps(_sharded_facts()))

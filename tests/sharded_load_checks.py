"""Loads into sharded templates on 8 CPU devices, for tests/test_interop_sharded*.py.

``python tests/sharded_load_checks.py FOLDER`` reads ``FOLDER/plan.json``: ``{"cases":
[{"name", "files": [...], "template": "bert" | "resnet" | "nnx"}], "config": {...}}``. For each
file, each template and each pattern of ``PATTERNS`` it loads the file into a template whose
every leaf has a ``NamedSharding`` on a 2x4 mesh, and into one without shardings, and prints one
JSON line: per load the leaves whose sharding, shard shapes or bits differ from the unsharded
load, and the specs given. The loads from the first file are saved back to
``FOLDER/back_<name>_<pattern>.safetensors`` with that file as ``torch_template``, for the test
to compare with PyTorch's tensors. Run it in a fresh process: it forces 8 host devices before
the CPU backend starts (importing this module changes nothing).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import interop

AXES = {"x": 2, "y": 4}
Wanted = dict[int, tuple[str, ...]]
PATTERNS: dict[str, Callable[[tuple[int, ...]], Wanted]] = {
    "replicated": lambda shape: {},
    "first": lambda shape: {0: ("x", "y")},
    "last": lambda shape: {-1: ("x", "y")},
    "both": lambda shape: {-2: ("x",), -1: ("y",)} if len(shape) > 1 else {0: ("y",)},
    "swapped": lambda shape: {0: ("y",), -1: ("x",)} if len(shape) > 1 else {0: ("x",)},
    "partial": lambda shape: {int(np.argmax(shape)): ("x",)},
}


def spec(shape: tuple[int, ...], wanted: Wanted) -> P:
    """``wanted`` (dim -> mesh axes) as a PartitionSpec, leaving out dims the axes do not
    divide."""
    parts: list[Any] = [None] * len(shape)
    for dim, axes in wanted.items():
        if shape and shape[dim] % math.prod(AXES[a] for a in axes) == 0:
            parts[dim] = axes if len(axes) > 1 else axes[0]
    return P(*parts)


class Mixed(nnx.Module):
    """An nnx model of every kind of leaf, its kernels annotated to be sharded."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        split, init = nnx.with_partitioning, nnx.initializers
        self.embed = nnx.Embed(48, 32, rngs=rngs, embedding_init=split(init.normal(), ("y", None)))
        conv_init = split(init.lecun_normal(), (None, None, "x", "y"))
        self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs, kernel_init=conv_init)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        fc_init = split(init.lecun_normal(), ("y", "x"))
        self.fc = nnx.Linear(32, 64, rngs=rngs, kernel_init=fc_init)
        self.norm = nnx.LayerNorm(64, rngs=rngs, scale_init=split(init.ones, ("y",)))


def templates(kind: str, config: dict[str, Any]) -> tuple[Any, Callable[[Any, Any], Any]]:
    """The unsharded template of a model, and how to give it a pattern's shardings."""
    mesh = jax.make_mesh(tuple(AXES.values()), tuple(AXES))
    if kind == "nnx":
        graph, state = nnx.get_abstract_model(lambda: Mixed(nnx.Rngs(0)), mesh)
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        return plain, lambda _, pattern: state if pattern == "state" else nnx.merge(graph, state)
    import transformers

    name = {"bert": ("BertConfig", "FlaxBertModel"), "resnet": ("ResNetConfig", "FlaxResNetModel")}
    config_class, model_class = name[kind]
    flax = getattr(transformers, model_class)(
        getattr(transformers, config_class)(**config[kind]), _do_init=False
    )
    shapes = jax.eval_shape(lambda: flax.init_weights(jax.random.PRNGKey(0), flax.input_shape))
    plain = dict(shapes) if "params" in shapes else {"params": shapes}

    def sharded(template: Any, pattern: str) -> Any:
        def leaf(a: Any) -> jax.ShapeDtypeStruct:
            where = NamedSharding(mesh, spec(a.shape, PATTERNS[pattern](a.shape)))
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where)

        return jax.tree.map(leaf, template)

    return plain, sharded


def bits(x: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def compare(loaded: Any, template: Any, reference: Any) -> dict[str, Any]:
    """Leaves of ``loaded`` whose sharding is not the template's, or whose shards are not the
    reference's blocks, and the specs given, by path."""
    got, want, ref = _plain(loaded), _plain(template), _plain(reference)
    wrong, specs = [], {}
    assert sorted(got) == sorted(want) == sorted(ref), (sorted(got), sorted(want))
    for path, leaf in got.items():
        sharding = want[path].sharding
        specs[path] = [list(leaf.shape), [p if p is None or isinstance(p, str) else "+".join(p)
                                          for p in sharding.spec]]  # fmt: skip
        if not isinstance(leaf, jax.Array) or leaf.sharding != sharding:
            wrong.append(f"{path}: sharding {getattr(leaf, 'sharding', type(leaf))} != {sharding}")
            continue
        if bits(leaf) != bits(ref[path]) or leaf.dtype != ref[path].dtype:
            wrong.append(f"{path}: values differ from the unsharded load")
        for shard in leaf.addressable_shards:
            if shard.data.shape != sharding.shard_shape(leaf.shape):
                wrong.append(f"{path}: device {shard.device} holds {shard.data.shape}")
            if bits(shard.data) != bits(np.asarray(ref[path])[shard.index]):
                wrong.append(f"{path}: the shard of device {shard.device} differs")
    return {"wrong": wrong, "specs": specs}


def _plain(tree: Any) -> dict[str, Any]:
    """Leaves by key path; an nnx Module's Param and BatchStat leaves."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, (nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def refusals(file: Path) -> dict[str, str]:
    """What loading ``file`` (a ``fc.weight`` (8, 10) and ``fc.bias`` (8,)) says for each
    template sharding that cannot be honoured; whether the spec an abstract mesh gets inside
    ``jax.set_mesh`` is the concrete one, and a sharded ``cast=True`` load to bfloat16 gives
    the unsharded one's shards."""
    mesh = jax.make_mesh(tuple(AXES.values()), tuple(AXES))

    def template(kernel: Any, dtype: Any = np.float32) -> dict[str, Any]:
        bias = jax.ShapeDtypeStruct((8,), dtype, sharding=NamedSharding(mesh, P("y")))
        return {"params": {"fc": {"kernel": kernel, "bias": bias}}}

    def said(tmpl: Any, **options: Any) -> str:
        try:
            interop.load_checkpoint(file, tmpl, **options)
        except ValueError as e:
            return str(e)
        return "loaded"

    uneven = jax.ShapeDtypeStruct((10, 8), np.float32, sharding=NamedSharding(mesh, P("y")))
    abstract = NamedSharding(mesh.abstract_mesh, P(None, "y"))
    kernel = jax.ShapeDtypeStruct((10, 8), np.float32, sharding=abstract)
    with jax.set_mesh(mesh):
        inside = interop.load_checkpoint(file, template(kernel))["params"]["fc"]["kernel"]
    wide = jax.ShapeDtypeStruct((10, 8), np.float64, sharding=NamedSharding(mesh, P("x")))
    half = jax.ShapeDtypeStruct((10, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "y")))
    cast = interop.load_checkpoint(file, template(half, jnp.bfloat16), cast=True)
    fc = {"kernel": jnp.zeros((10, 8), jnp.bfloat16), "bias": jnp.zeros(8, jnp.bfloat16)}
    want = interop.load_checkpoint(file, {"params": {"fc": fc}}, cast=True)
    return {
        "cast_equal": compare(cast, template(half, jnp.bfloat16), want)["wrong"] == [],
        "uneven": said(template(uneven)),
        "abstract": said(template(kernel)),
        "float64": said(template(wide, np.float64), cast=True),
        "abstract_inside_set_mesh": str(inside.sharding == NamedSharding(mesh, P(None, "y"))),
    }


def main(folder: Path) -> None:
    plan = json.loads((folder / "plan.json").read_text())
    facts: dict[str, Any] = {"devices": jax.device_count()}
    for case in plan["cases"]:
        plain, sharded = templates(case["template"], plan.get("config", {}))
        patterns = ["state", "module"] if case["template"] == "nnx" else list(PATTERNS)
        for file in case["files"]:
            reference = interop.load_checkpoint(folder / file, plain)
            for pattern in patterns:
                template = sharded(plain, pattern)
                loaded = interop.load_checkpoint(folder / file, template)
                facts[f"{case['name']}/{file}/{pattern}"] = compare(loaded, template, reference)
                if file == case["files"][0]:
                    back = folder / f"back_{case['name']}_{pattern}.safetensors"
                    interop.save_checkpoint(back, net=loaded, torch_template=folder / file)
    if "refusals" in plan:
        facts["refusals"] = refusals(folder / plan["refusals"])
    print(json.dumps(facts))


if __name__ == "__main__":
    # Read when the CPU backend starts, i.e. at the first jax call in main(), not at import.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    main(Path(sys.argv[1]))

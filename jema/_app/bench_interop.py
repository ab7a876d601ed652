"""(i) interop's checkpoint files against ``torch.save``/``torch.load`` of the same weights.

Run ``python -m jema bench-interop`` (or ``jema bench-interop``). On ``--megabytes`` of float32
conv and dense kernels it prints a markdown table. Saves, against ``torch.save`` of the
state_dict (fsynced, the reference): ``interop.write_checkpoint`` of the same state_dict as
numpy arrays (no torch; goal at most 1.0x), ``interop.save_checkpoint`` of the Flax tree to
``.pth`` (goal at most 1.25x) and to ``.safetensors``. Reads of ``torch.save``'s file:
``interop.read_checkpoint`` against ``torch.load(mmap=True, weights_only=True)`` (goal at most
1.0x); ``interop.load_checkpoint`` against ``torch.load(mmap=True)`` with the transposing copy
each kernel needs.

The rows run round-robin, ``--repeats`` rounds after a warm-up one. A row's ms is its median
over the rounds, its ratio the median of its ratios to its reference in the same round (a busy
spell on a shared machine slows both alike), the lowest and highest in brackets.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jema._app.arguments import Parser, positive_int
from jema._app.bench import Case, Row, format_table, time_cases

GOALS = {"write": 1.0, "save": 1.25, "read": 1.0}  # against torch.save or torch.load, fsynced


def flax_tree(megabytes: int) -> dict[str, Any]:
    """Float32 conv (3, 3, 256, 512) and dense (1024, 4096) kernels, alternating, to the size.

    Args:
      megabytes: the tree's size in MB (at least one layer).

    Returns:
      ``{"params": {"layer_i": {"kernel": ...}}}`` of jax arrays.

    Example:
      >>> flax_tree(1)["params"]["layer_0"]["kernel"].shape
      (3, 3, 256, 512)
    """
    rng = np.random.default_rng(0)
    layers, size, i = {}, 0, 0
    while size == 0 or size < megabytes * 1e6:
        shape = (3, 3, 256, 512) if i % 2 == 0 else (1024, 4096)
        kernel = rng.standard_normal(shape, dtype=np.float32)
        layers[f"layer_{i}"] = {"kernel": jnp.asarray(kernel)}
        size, i = size + kernel.nbytes, i + 1
    return {"params": layers}


def measure(megabytes: int, repeats: int, folder: str) -> list[Row]:
    """Time the (i) rows in ``folder``; needs torch (the reference rows run it).

    Args:
      megabytes: the weights' size.
      repeats: timed rounds (every row once each, round-robin).
      folder: where the files go.

    Returns:
      The rows: saves (reference first), then reads and loads (each after its reference).

    Example:
      >>> import tempfile
      >>> [row.name[:3] for row in measure(1, 1, tempfile.mkdtemp())]
      ['(i)', '(i)', '(i)', '(i)', '(i)', '(i)', '(i)', '(i)']
    """
    import torch

    import interop

    tree = flax_tree(megabytes)
    state_dict = interop.flax_to_torch(tree)
    arrays = {key: tensor.numpy() for key, tensor in state_dict.items()}  # the same memory
    paths = {kind: os.path.join(folder, f"bench.{kind}") for kind in ("pt", "pth", "safetensors")}

    def torch_save(carry: Any) -> Any:
        torch.save({"net": state_dict}, paths["pt"])
        descriptor = os.open(paths["pt"], os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
        return carry

    def torch_load(carry: Any) -> Any:
        loaded = torch.load(paths["pt"], mmap=True, weights_only=True)["net"]
        for tensor in loaded.values():
            array = tensor.numpy()
            axes = (*range(2, array.ndim), 1, 0) if array.ndim > 1 else (0,)
            np.ascontiguousarray(array.transpose(axes))
        return carry

    saves = [
        Case("(i) torch.save of the state_dict, fsynced", torch_save, None),
        Case(
            "(i) interop.write_checkpoint of it as numpy, .pth",
            lambda c: interop.write_checkpoint(paths["pth"], {"net": arrays}),
            None,
        ),
        Case(
            "(i) interop.save_checkpoint, .pth",
            lambda c: interop.save_checkpoint(paths["pth"], net=tree),
            None,
        ),
        Case(
            "(i) interop.save_checkpoint, .safetensors",
            lambda c: interop.save_checkpoint(paths["safetensors"], net=tree),
            None,
        ),
    ]
    loads = [
        Case(
            "(i) torch.load(mmap=True, weights_only=True) of torch.save's file",
            lambda c: torch.load(paths["pt"], mmap=True, weights_only=True),
            None,
        ),
        Case(
            "(i) interop.read_checkpoint of torch.save's file",
            lambda c: interop.read_checkpoint(paths["pt"]),
            None,
        ),
        Case("(i) torch.load(mmap) + transposing copies", torch_load, None),
        Case(
            "(i) interop.load_checkpoint of torch.save's file",
            lambda c: interop.load_checkpoint(paths["pt"], tree),
            None,
        ),
    ]
    rounds = [
        time_cases(saves, 1, warmup=int(i == 0)) | time_cases(loads, 1, warmup=int(i == 0))
        for i in range(repeats)
    ]
    return _rows(rounds, megabytes)


# Each row's reference (by position) and its goal, if it has one.
_REFERENCES = [(0, None), (0, "write"), (0, "save"), (0, None), (4, None), (4, "read"), (6, None)]
_REFERENCES += [(6, None)]


def _rows(rounds: list[dict[str, float]], megabytes: int) -> list[Row]:
    names = list(rounds[0])
    rows = []
    for name, (reference, goal) in zip(names, _REFERENCES, strict=True):
        seconds = statistics.median(r[name] for r in rounds)
        ratios = [r[name] / r[names[reference]] for r in rounds]
        ratio = statistics.median(ratios)
        rate = f"{megabytes / 1e3 / seconds:.2f} GB/s, {ratio:.2f}x reference"
        if len(rounds) > 1 and name != names[reference]:
            rate += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        if goal is None:
            rows.append(Row(name, 1e3 * seconds, rate))
        else:
            target = "torch.save" if goal != "read" else "torch.load"
            met = ratio <= GOALS[goal]
            rows.append(Row(name, 1e3 * seconds, rate, f"<= {GOALS[goal]}x {target}", met))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jema bench-interop [--repeats N] [--megabytes M]``; needs torch.

    Args:
      argv: the arguments; None reads ``sys.argv``.

    Returns:
      The exit status: 0, or 1 without torch (one line on stderr).

    Example:
      >>> import torch  # the example's table needs it
      >>> main(["--repeats", "1", "--megabytes", "1"])  # doctest: +ELLIPSIS
      | row | ms | ...
      0
    """
    parser = Parser(prog="jema bench-interop", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed rounds")
    parser.add_argument("--megabytes", type=positive_int, default=360, help="size of the weights")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print('jema bench-interop compares with torch: pip install "jema[torch]"', file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as folder:
        print(format_table(measure(args.megabytes, args.repeats, folder)))
    return 0

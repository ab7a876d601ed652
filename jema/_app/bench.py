"""Speed of jema's EMA update against a streaming reference, optax adam and PyTorch.

Run ``python -m jema bench`` (or ``jema bench``). On a tree of ``--params`` float32 weights
split into ``--leaves`` leaves it prints a markdown table with:

- (a) a donated, jitted ``a + b`` over the tree: 3 memory streams, the bandwidth reference;
- (b) jema's EMA update alone (``ema_transform(...).update``, donated): 4 streams (read EMA,
  params, updates; write EMA), as effective GB/s and as a fraction of (a);
- (c) a jitted, donated ``adam`` train step, with and without the EMA, and their ratio;
- (d) PyTorch on as many threads as JAX uses: foreach Adam, then the EMA as timm does it
  (``torch._foreach_lerp_``) and as SuperGradients does it (``ema.copy_(ema*d + (1-d)*p)``).
- (h) the EMA in host memory against the EMA on the accelerator, on 1 GiB of weights
  (``jema._app.bench_hostmem``; on a CPU the rows say that they need an accelerator).

Every row is timed round-robin with the others (so a busy machine slows them alike), after
warm-up, and reported as the median of ``repeats`` runs.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jema
from jema._app.arguments import bench_parser

DECAY = 0.9999
DECAY_TYPE = "threshold"
LEARNING_RATE = 1e-3
IDEAL_RATIO = 9 / 7  # adam streams 7 arrays, a fused EMA two more
MAX_RATIO = 1.30
MIN_FRACTION = 0.9
WARMUP = 2

Tree = dict[str, Any]


@dataclass
class Case:
    """One timed row: ``carry = step(carry)`` is one run, finished when it returns.

    Attributes:
      name: the row's label.
      step: one run; takes the carry (donated buffers included) and returns the next one.
      carry: the arrays the next run consumes.
    """

    name: str
    step: Callable[[Any], Any]
    carry: Any


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
      name: the row's label.
      ms: median milliseconds per run.
      rate: effective GB/s or a ratio, as text.
      target: the goal, as text ("" for context rows).
      met: whether the goal is met; None for context rows.
    """

    name: str
    ms: float
    rate: str
    target: str = ""
    met: bool | None = None


def leaf_sizes(params: int, leaves: int) -> list[int]:
    """Split ``params`` weights into ``leaves`` near-equal leaf sizes.

    Args:
      params: total number of weights, at least ``leaves``.
      leaves: number of leaves, at least 1.

    Returns:
      ``leaves`` sizes summing to ``params``, the larger ones first.

    Raises:
      ValueError: when ``leaves < 1`` or ``params < leaves``.

    Example:
      >>> leaf_sizes(10, 3)
      [4, 3, 3]
    """
    if leaves < 1 or params < leaves:
        raise ValueError(f"need params >= leaves >= 1; got params={params}, leaves={leaves}")
    base, extra = divmod(params, leaves)
    return [base + (i < extra) for i in range(leaves)]


def numpy_tree(sizes: Sequence[int], seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A dict of 1-D float32 normal arrays, one per size, keyed ``w000``, ``w001``, ...

    Args:
      sizes: each leaf's length.
      seed: the random seed.
      scale: the standard deviation.

    Returns:
      The tree, as numpy arrays.

    Example:
      >>> numpy_tree([2, 1], seed=0)["w001"].shape
      (1,)
    """
    rng = np.random.default_rng(seed)
    return {
        f"w{i:03d}": (scale * rng.standard_normal(n, dtype=np.float32)) for i, n in enumerate(sizes)
    }


def jax_tree(sizes: Sequence[int], seed: int, scale: float = 1.0) -> Tree:
    """:func:`numpy_tree` as JAX arrays (each its own buffer, so it can be donated).

    Args:
      sizes: each leaf's length.
      seed: the random seed.
      scale: the standard deviation.

    Returns:
      The tree, as JAX arrays.

    Example:
      >>> jax_tree([3], seed=0)["w000"].dtype
      dtype('float32')
    """
    return jax.tree.map(jnp.array, numpy_tree(sizes, seed, scale))


def add_case(sizes: Sequence[int]) -> Case:
    """(a) the bandwidth reference: ``a = a + b`` leaf by leaf, jitted, ``a`` donated.

    Args:
      sizes: the leaves' lengths.

    Returns:
      The case; its carry is ``(a, b)``.

    Example:
      >>> case = add_case([4]); case.carry = case.step(case.carry)
    """
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    return Case(
        "(a) `a + b`, jitted, donated",
        lambda c: (jax.block_until_ready(add(*c)), c[1]),
        (jax_tree(sizes, 0), jax_tree(sizes, 1)),
    )


def ema_case(
    sizes: Sequence[int], *, name: str = "(b) jema EMA update alone", where: Any = None
) -> Case:
    """(b) jema's EMA update alone: ``tx.update(updates, state, params)``, jitted.

    The updates and the state are donated, so the updates passing through cost no copy
    (donate only the state and JAX pairs the EMA's buffers with the returned updates,
    which then costs two copies per leaf).

    Args:
      sizes: the leaves' lengths.
      name: the row's label.
      where: a device or sharding to place the trees on (``jax.device_put``); None for the
        default device.

    Returns:
      The case; its carry is ``(updates, state, params)``; params stay fixed, so each run
      averages ``params + updates`` into the EMA.

    Example:
      >>> case = ema_case([4]); case.carry = case.step(case.carry)
      >>> int(case.carry[1].count)
      1
    """
    tx = jema.ema_transform(DECAY, DECAY_TYPE)
    update = jax.jit(tx.update, donate_argnums=(0, 1))
    params = jax.device_put(jax_tree(sizes, 2), where)
    updates = jax.device_put(jax_tree(sizes, 3, scale=1e-2), where)
    carry = (updates, jax.jit(tx.init)(params), params)
    return Case(name, lambda c: (*jax.block_until_ready(update(*c)), c[2]), carry)


def train_case(name: str, optimizer: optax.GradientTransformation, sizes: Sequence[int]) -> Case:
    """(c) one jitted train step, params and optimizer state donated.

    The step is ``updates, state = opt.update(grads, state, params)`` then
    ``params = optax.apply_updates(params, updates)``.

    Args:
      name: the row's label.
      optimizer: the optax transformation.
      sizes: the leaves' lengths.

    Returns:
      The case; its carry is ``(params, state, grads)``.

    Example:
      >>> case = train_case("sgd", optax.sgd(0.1), [4]); case.carry = case.step(case.carry)
    """

    def train_step(params: Tree, state: Any, grads: Tree) -> tuple[Tree, Any]:
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    params = jax_tree(sizes, 4)
    carry = (params, optimizer.init(params), jax_tree(sizes, 5))
    return Case(name, lambda c: (*jax.block_until_ready(step(*c)), c[2]), carry)


def torch_cases(sizes: Sequence[int], threads: int) -> list[Case]:
    """(d) PyTorch foreach Adam, alone and with timm's and SuperGradients' EMA updates.

    Args:
      sizes: the leaves' lengths.
      threads: torch's intra-op threads (set to what JAX uses, for a fair comparison).

    Returns:
      The cases (carry: the step number), or ``[]`` with a printed note when torch is
      missing.

    Example:
      >>> all(case.name.startswith("(d)") for case in torch_cases([4], threads=2))
      True
    """
    try:
        import torch
    except ImportError:
        print("note: PyTorch is not installed; the (d) rows are skipped.", file=sys.stderr)
        return []
    torch.set_num_threads(threads)
    emas = {"alone": None, "timm": _timm_ema, "sg": _sg_ema}
    names = {
        "alone": "(d) torch Adam(foreach=True)",
        "timm": "(d) torch Adam + `_foreach_lerp_` EMA (timm)",
        "sg": "(d) torch Adam + per-tensor `copy_` EMA (SG)",
    }
    return [Case(names[k], _torch_step(torch, sizes, ema), 0) for k, ema in emas.items()]


def _torch_step(torch: Any, sizes: Sequence[int], ema: Callable | None) -> Callable[[int], int]:
    params = [torch.from_numpy(a).requires_grad_() for a in numpy_tree(sizes, 4).values()]
    for p, g in zip(params, numpy_tree(sizes, 5).values(), strict=True):
        p.grad = torch.from_numpy(g)
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, foreach=True)
    with torch.no_grad():
        averages = [p.detach().clone() for p in params]

    def step(count: int) -> int:
        optimizer.step()
        count += 1  # SG's 1-based step, and its "threshold" decay
        if ema is not None:
            with torch.no_grad():
                ema(torch, averages, params, min(DECAY, (1 + count) / (10 + count)))
        return count

    return step


def _timm_ema(torch: Any, averages: list, params: list, decay: float) -> None:
    torch._foreach_lerp_(averages, params, 1.0 - decay)


def _sg_ema(torch: Any, averages: list, params: list, decay: float) -> None:
    for average, param in zip(averages, params, strict=True):
        average.copy_(average * decay + (1.0 - decay) * param)


def time_cases(cases: Sequence[Case], repeats: int, warmup: int = WARMUP) -> dict[str, float]:
    """Median seconds per run of each case, running the cases round-robin.

    Args:
      cases: the cases; their carries advance.
      repeats: timed runs per case.
      warmup: untimed runs per case first (compilation, first touch of memory).

    Returns:
      ``{case.name: median seconds}``.

    Example:
      >>> time_cases([Case("noop", lambda c: c, 0)], repeats=3)["noop"] < 1
      True
    """
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for i in range(warmup + repeats):
        for case in cases:
            start = time.perf_counter()
            case.carry = case.step(case.carry)
            if i >= warmup:
                times[case.name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(params: int, leaves: int, repeats: int) -> list[Row]:
    """Build every case on a tree of ``params`` weights in ``leaves`` leaves, time, tabulate.

    Args:
      params: total float32 weights.
      leaves: number of leaves.
      repeats: timed runs per row.

    Returns:
      The table's rows, in order (a), (b), (c) adam, (c) adam + EMA, then the torch rows.

    Example:
      >>> [r.name[:3] for r in measure(64, 2, repeats=1)][:4]
      ['(a)', '(b)', '(c)', '(c)']
    """
    sizes = leaf_sizes(params, leaves)
    jax_cases = [
        add_case(sizes),
        ema_case(sizes),
        train_case("(c) optax adam step", optax.adam(LEARNING_RATE), sizes),
        train_case(
            "(c) optax adam + jema EMA step",
            jema.with_ema(optax.adam(LEARNING_RATE), decay=DECAY, decay_type=DECAY_TYPE),
            sizes,
        ),
    ]
    seconds = time_cases(jax_cases, repeats)
    # Timed apart: torch's OpenMP threads spin after each op and would slow JAX's next run.
    seconds |= time_cases(torch_cases(sizes, _jax_threads()), repeats)
    return _rows(list(seconds.items()), 4 * params)


def _rows(seconds: list[tuple[str, float]], nbytes: int) -> list[Row]:
    (add, t_add), (ema, t_ema), (adam, t_adam), (adam_ema, t_adam_ema) = seconds[:4]
    add_rate, ema_rate = 3 * nbytes / t_add, 4 * nbytes / t_ema
    ratio = t_adam_ema / t_adam
    rows = [
        Row(add, 1e3 * t_add, f"{add_rate / 1e9:.1f} GB/s", "reference"),
        Row(
            ema,
            1e3 * t_ema,
            f"{ema_rate / 1e9:.1f} GB/s = {ema_rate / add_rate:.2f}x (a)",
            f">= {MIN_FRACTION}x (a)",
            ema_rate >= MIN_FRACTION * add_rate,
        ),
        Row(adam, 1e3 * t_adam, f"{7 * nbytes / t_adam / 1e9:.1f} GB/s (7 streams)"),
        Row(
            adam_ema,
            1e3 * t_adam_ema,
            f"{ratio:.3f}x adam (ideal {IDEAL_RATIO:.2f})",
            f"<= {MAX_RATIO:.2f}x adam",
            ratio <= MAX_RATIO,
        ),
    ]
    for name, t in seconds[4:]:
        with_ema = "EMA" in name
        base, label = (t_adam_ema, "jema adam + EMA") if with_ema else (t_adam, "optax adam")
        rows.append(
            Row(
                name,
                1e3 * t,
                f"{label} is {t / base:.2f}x faster",
                "jema faster" if with_ema else "",
                t > base if with_ema else None,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table.

    Args:
      rows: the rows.

    Returns:
      The table, header first, one line per row.

    Example:
      >>> print(format_table([Row("x", 1.0, "2 GB/s")]).splitlines()[2])
      | x | 1.00 | 2 GB/s |  |  |
    """
    lines = ["| row | ms | GB/s or ratio | target | met? |", "|---|---:|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        ms = "n/a" if math.isnan(r.ms) else f"{r.ms:.2f}"
        lines.append(f"| {r.name} | {ms} | {r.rate} | {r.target} | {met} |")
    return "\n".join(lines)


def run(repeats: int = 20, params: int = 25_000_000, leaves: int = 100) -> list[Row]:
    """Measure and print the table, with the setup it ran on.

    Args:
      repeats: timed runs per row (the median is reported).
      params: total float32 weights in the tree.
      leaves: number of leaves the weights are split into.

    Returns:
      The table's rows.

    Example:
      >>> rows = run(repeats=1, params=1000, leaves=4)  # doctest: +ELLIPSIS
      jema bench: 1,000 float32 params in 4 leaves, median of 1 runs; ...
      >>> [row.name[:3] for row in rows][:4]
      ['(a)', '(b)', '(c)', '(c)']
    """
    print(
        f"jema bench: {params:,} float32 params in {leaves} leaves, median of {repeats} runs; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{_jax_threads()} threads for JAX and torch"
    )
    from jema._app.bench_hostmem import hostmem_rows  # it builds on this module's cases

    rows = measure(params, leaves, repeats) + hostmem_rows(repeats)
    print(format_table(rows))
    return rows


def _jax_threads() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jema bench [--repeats N] [--params P] [--leaves L]``.

    Args:
      argv: the arguments; None reads ``sys.argv``.

    Returns:
      The exit status (0).

    Example:
      >>> main(["--repeats", "1", "--params", "1000", "--leaves", "4"])  # doctest: +ELLIPSIS
      jema bench: ...
      0
    """
    description = __doc__.splitlines()[0]
    parser = bench_parser("jema bench", description, repeats=20)
    args = parser.parse_args(argv)
    run(repeats=args.repeats, params=args.params, leaves=args.leaves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

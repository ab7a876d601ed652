"""Speed of post-hoc EMA: power_ema's fused update of two widths, and reconstruct.

Run ``jema bench-posthoc`` (or ``python -m jema._app.bench_posthoc``). On a tree of ``--params``
float32 weights split into ``--leaves`` leaves it prints a markdown table with:

- (a) one ``ema_transform`` update, jitted and donated: 4 memory streams (read the EMA, params
  and updates; write the EMA), the reference;
- (b) ``power_ema((0.05, 0.10))``'s update: both widths in one pass, 6 streams (params and
  updates read once; two EMAs read and written), ideally 1.5x (a); the goal is <= 1.75x;
- (c) two ``ema_transform`` updates, each jitted and donated, as two separate EMAs cost;
- (d) reading ``--snapshots`` snapshots of both widths (float32, from the page cache) with
  ``jema.posthoc.load_snapshot``, one width of one snapshot at a time;
- (e) ``jema.posthoc.reconstruct`` of σ_rel 0.07 from them, as a fraction of (d).

Rows are timed round-robin after warm-up; each is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import optax

import jema
from jema import posthoc
from jema._app.arguments import bench_parser, positive_int
from jema._app.bench import (
    DECAY,
    DECAY_TYPE,
    Case,
    Row,
    ema_case,
    format_table,
    jax_tree,
    leaf_sizes,
    time_cases,
)

WIDTHS = (0.05, 0.10)
TARGET = 0.07
IDEAL_RATIO = 6 / 4
MAX_RATIO = 1.75


def power_case(sizes: Sequence[int]) -> Case:
    """(b) ``power_ema(WIDTHS)``'s update alone, jitted, updates and state donated.

    Args:
      sizes: the leaves' lengths.

    Returns:
      The case; its carry is ``(updates, (state,), params)`` (params fixed).

    Example:
      >>> case = power_case([4]); case.carry = case.step(case.carry)
      >>> int(jema.ema_count(case.carry[1]))
      1
    """
    return _updates_case("(b) `power_ema` update, 2 widths fused", [jema.power_ema(WIDTHS)], sizes)


def separate_case(sizes: Sequence[int]) -> Case:
    """(c) two ``ema_transform`` updates, each jitted with updates and state donated.

    Args:
      sizes: the leaves' lengths.

    Returns:
      The case; its carry is ``(updates, (state, state), params)``.

    Example:
      >>> case = separate_case([4]); case.carry = case.step(case.carry)
      >>> [int(s.count) for s in case.carry[1]]
      [1, 1]
    """
    txs = [jema.ema_transform(DECAY, DECAY_TYPE) for _ in WIDTHS]
    return _updates_case("(c) two `ema_transform` updates", txs, sizes)


def _updates_case(
    name: str, txs: list[optax.GradientTransformationExtraArgs], sizes: Sequence[int]
) -> Case:
    """Each transform's update jitted on its own, run one after the other on the same params."""
    updates_fns = [jax.jit(tx.update, donate_argnums=(0, 1)) for tx in txs]
    params = jax_tree(sizes, 2)

    def step(carry: Any) -> Any:
        updates, states, params = carry
        new_states = []
        for update, state in zip(updates_fns, states, strict=True):
            updates, state = update(updates, state, params)
            new_states.append(state)
        return *jax.block_until_ready((updates, tuple(new_states))), params

    states = tuple(jax.jit(tx.init)(params) for tx in txs)
    return Case(name, step, (jax_tree(sizes, 3, scale=1e-2), states, params))


def snapshot_cases(sizes: Sequence[int], snapshots: int, folder: str) -> list[Case]:
    """(d) and (e): ``snapshots`` snapshots saved into ``folder``, read alone and reconstructed.

    Args:
      sizes: the leaves' lengths.
      snapshots: how many snapshots (each holds both widths, float32).
      folder: an empty folder to save them into.

    Returns:
      The two cases (carry: None).

    Example:
      >>> import tempfile
      >>> [c.name[:3] for c in snapshot_cases([4], 2, tempfile.mkdtemp())]
      ['(d)', '(e)']
    """
    case = power_case(sizes)
    for _ in range(snapshots):
        case.carry = case.step(case.carry)
        posthoc.save_snapshot(folder, case.carry[1])
    steps = [s.step for s in posthoc.list_snapshots(folder)]

    def read_all(carry: None) -> None:
        for step in steps:
            for width in WIDTHS:
                posthoc.load_snapshot(folder, step, width)

    def rebuild(carry: None) -> None:
        posthoc.reconstruct(folder, TARGET)

    return [
        Case(f"(d) read {snapshots} snapshots x 2 widths alone", read_all, None),
        Case(f"(e) `reconstruct` sigma_rel {TARGET} from them", rebuild, None),
    ]


def measure(params: int, leaves: int, repeats: int, snapshots: int) -> list[Row]:
    """Build every case, time them, and tabulate.

    Args:
      params: total float32 weights.
      leaves: number of leaves.
      repeats: timed runs per row.
      snapshots: snapshots for rows (d) and (e).

    Returns:
      The rows (a) to (e).

    Example:
      >>> [r.name[:3] for r in measure(64, 2, repeats=1, snapshots=2)]
      ['(a)', '(b)', '(c)', '(d)', '(e)']
    """
    sizes = leaf_sizes(params, leaves)
    nbytes = 4 * params
    with tempfile.TemporaryDirectory(prefix="jema-bench-posthoc-") as folder:
        cases = [ema_case(sizes, name="(a) one `ema_transform` update")]
        cases += [power_case(sizes), separate_case(sizes)]
        cases += snapshot_cases(sizes, snapshots, folder)
        seconds = list(time_cases(cases, repeats).items())
    (a, t_a), (b, t_b), (c, t_c), (d, t_d), (e, t_e) = seconds
    stored = snapshots * len(WIDTHS) * nbytes
    ratio = t_b / t_a
    return [
        Row(a, 1e3 * t_a, f"{4 * nbytes / t_a / 1e9:.1f} GB/s (4 streams)", "reference"),
        Row(
            b,
            1e3 * t_b,
            f"{ratio:.2f}x (a) (ideal {IDEAL_RATIO:.2f}: 6 streams)",
            f"<= {MAX_RATIO:.2f}x (a)",
            ratio <= MAX_RATIO,
        ),
        Row(c, 1e3 * t_c, f"{t_c / t_a:.2f}x (a) = {t_c / t_b:.2f}x (b)"),
        Row(d, 1e3 * t_d, f"{stored / t_d / 1e9:.2f} GB/s of snapshots"),
        Row(e, 1e3 * t_e, f"{stored / t_e / 1e9:.2f} GB/s = {t_d / t_e:.2f}x (d)"),
    ]


def run(
    repeats: int = 10, params: int = 25_000_000, leaves: int = 100, snapshots: int = 4
) -> list[Row]:
    """Measure and print the table, with the setup it ran on.

    Args:
      repeats: timed runs per row (the median is reported).
      params: total float32 weights in the tree.
      leaves: number of leaves the weights are split into.
      snapshots: snapshots for the reconstruct rows.

    Returns:
      The table's rows.

    Example:
      >>> rows = run(repeats=1, params=100, leaves=2, snapshots=2)  # doctest: +ELLIPSIS
      jema bench-posthoc: 100 float32 params in 2 leaves, 2 snapshots, median of 1 runs; ...
    """
    print(
        f"jema bench-posthoc: {params:,} float32 params in {leaves} leaves, {snapshots} snapshots, "
        f"median of {repeats} runs; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    rows = measure(params, leaves, repeats, snapshots)
    print(format_table(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``jema bench-posthoc [--repeats N] [--params P] [--leaves L] [--snapshots S]``.

    Args:
      argv: the arguments; None reads ``sys.argv``.

    Returns:
      The exit status (0).

    Example:
      >>> main(["--repeats", "1", "--params", "100", "--leaves", "2", "--snapshots", "2"])
      ... # doctest: +ELLIPSIS
      jema bench-posthoc: ...
      0
    """
    parser = bench_parser("jema bench-posthoc", __doc__.splitlines()[0], repeats=10)
    parser.add_argument(
        "--snapshots", type=positive_int, default=4, help="snapshots for the reconstruct rows"
    )
    args = parser.parse_args(argv)
    run(repeats=args.repeats, params=args.params, leaves=args.leaves, snapshots=args.snapshots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Smoke test of jema.bench on a tiny tree: the table's shape and the EMA it computes (untimed)."""

import numpy as np
import pytest

from jema._app import bench, bench_interop
from tests.sg_reference import sg_ema_replay, sg_threshold


def test_table_has_every_row_and_column(capsys):
    rows = bench.run(repeats=1, params=60, leaves=3)
    names = [row.name[:3] for row in rows]
    torch_rows = 3 if _has_torch() else 0
    assert names == ["(a)", "(b)", "(c)", "(c)"] + ["(d)"] * torch_rows + ["(h)"] * 4
    timed, hostmem = rows[:-4], rows[-4:]  # (h) needs an accelerator; here they say so
    assert all(row.ms > 0 for row in timed)
    assert all(np.isnan(row.ms) and "needs an accelerator" in row.rate for row in hostmem)
    assert [row.met is None for row in rows[:4]] == [True, False, True, False]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| row | ms | GB/s or ratio | target | met? |"
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == 6 for line in table)


def test_ema_case_matches_numpy_replay():
    sizes = bench.leaf_sizes(10, 3)
    case = bench.ema_case(sizes)
    params = {k: np.asarray(v) for k, v in case.carry[2].items()}
    updates = {k: np.asarray(v) for k, v in case.carry[0].items()}
    for _ in range(5):
        case.carry = case.step(case.carry)
    for key, ema in case.carry[1].ema.items():
        new = params[key] + updates[key]
        expected = sg_ema_replay(params[key], [new] * 5, lambda s: sg_threshold(bench.DECAY, s))
        np.testing.assert_allclose(np.asarray(ema), expected, rtol=1e-6, atol=1e-7)


def test_leaf_sizes_split_evenly_and_reject_bad_input():
    assert bench.leaf_sizes(25_000_000, 100) == [250_000] * 100
    assert sum(bench.leaf_sizes(101, 7)) == 101
    with pytest.raises(ValueError, match="params >= leaves"):
        bench.leaf_sizes(2, 3)


def test_interop_rows_are_medians_of_paired_rounds():
    names = [f"row {i}" for i in range(8)]
    rounds = [
        dict(zip(names, [1.0, 0.9, 1.0, 4.0, 0.01, 0.011, 1.0, 0.5], strict=True)),
        dict(zip(names, [2.0, 1.6, 3.0, 8.0, 0.02, 0.03, 2.0, 0.5], strict=True)),
        dict(zip(names, [1.0, 1.2, 1.2, 4.0, 0.01, 0.008, 1.0, 0.5], strict=True)),
    ]
    rows = bench_interop._rows(rounds, megabytes=1000)
    write, save, read = rows[1], rows[2], rows[5]
    # 1.2 s against torch.save's 1.0 s over the rounds, but 0.9x, 0.8x, 1.2x round by round
    assert write.ms == pytest.approx(1200) and write.met is True
    assert write.rate == "0.83 GB/s, 0.90x reference (0.80-1.20)"
    assert write.target == "<= 1.0x torch.save"
    assert save.met is True and save.rate.endswith("1.20x reference (1.00-1.50)")
    assert read.met is False and read.target == "<= 1.0x torch.load"  # 1.1x, 1.5x, 0.8x
    assert rows[0].rate == "1.00 GB/s, 1.00x reference" and rows[0].met is None
    assert rows[7].rate.endswith("0.50x reference (0.25-0.50)")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True

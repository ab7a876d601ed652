"""Smoke test of jema.bench on a tiny tree: the table's shape and the EMA it computes (untimed)."""

import numpy as np
import pytest

from jema._app import bench
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


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True

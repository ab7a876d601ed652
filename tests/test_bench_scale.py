"""The scale benchmark's rows on tiny sizes (a smoke test of the table, not a timing test)."""

import numpy as np

import jema
from jema._app import bench
from jema._app.bench_scale import _sharded_in_subprocess, sparse_ema_case
from tests.sg_reference import sg_ema_replay, sg_threshold


def test_sparse_case_averages_every_kth_step_with_the_powered_decay():
    case = sparse_ema_case([5], every_k_steps=4)
    updates, _, params = (np.array(x["w000"]) if isinstance(x, dict) else x for x in case.carry)
    case.carry = case.step(case.carry)  # donates the updates and the state
    new = params + updates
    decays = {s: sg_threshold(bench.DECAY, s) ** 4 for s in (4, 8, 12, 16)}
    expected = sg_ema_replay(params, [new] * 4, lambda i: decays[4 * i])
    np.testing.assert_allclose(jema.ema_params(case.carry[1])["w000"], expected, rtol=2e-6)


def test_sharded_rows_come_from_an_8_device_subprocess_without_collectives():
    rows = _sharded_in_subprocess(params=4096, leaves=4, repeats=1)
    assert [r.name for r in rows] == ["(g) EMA update, 1 device", "(g) EMA update, 8-device mesh"]
    assert rows[1].rate == "collectives in the step: none"
    assert all(r.ms > 0 for r in rows)

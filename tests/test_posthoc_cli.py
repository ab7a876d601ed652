"""``jema posthoc DIR``: the list, the SG-layout ``.pth`` and ``.safetensors`` it writes (checked
against ``jema.posthoc.reconstruct`` and the demo's PyTorch twin), exit codes and one-line errors;
``jema bench-posthoc`` on a tiny tree."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop
import jema
from jema import posthoc
from jema._app import bench_posthoc
from jema._app.cli import main
from jema._app.models import DigitsCNN


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Snapshots every 5 of 20 steps of the demo's CNN (width 4) with BatchNorm statistics."""
    folder = tmp_path_factory.mktemp("snapshots")
    variables = DigitsCNN(4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    tx = jema.power_ema((0.05, 0.10))
    state = jema.attach_batch_stats(tx.init(variables["params"]), variables["batch_stats"])
    update = jax.jit(
        lambda s, p, b: tx.update(jax.tree.map(jnp.zeros_like, p), s, p, batch_stats=b)
    )
    for t in range(1, 21):
        moved = jax.tree.map(lambda x, t=t: x + 0.01 * t, variables)
        _, state = update(state, moved["params"], moved["batch_stats"])
        if t % 5 == 0:
            posthoc.save_snapshot(folder, state, dtype="float16")
    return folder, variables


def run(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "jema", *args], capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout, done.stderr


def test_list_prints_one_line_per_snapshot(snapshots, capsys):
    folder, _ = snapshots
    assert main(["posthoc", str(folder), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "sigma_rel", "stored", "as", "batch_stats"]
    assert [line.split()[0] for line in lines[1:-1]] == ["5", "10", "15", "20"]
    assert lines[1].split()[1:] == ["0.05,", "0.1", "float16", "yes"]
    assert lines[-1] == "4 snapshots"


def test_safetensors_holds_the_reconstruction_in_net_and_ema_net(snapshots, tmp_path, capsys):
    folder, variables = snapshots
    out = tmp_path / "ema.safetensors"
    args = ["posthoc", str(folder), "--sigma-rel", "0.07", "--step", "15", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        f"wrote {out}: ema_net = EMA of sigma_rel 0.07 at step 15 (net too)"
    )
    assert captured.err == ""
    want = {
        part: posthoc.reconstruct(folder, 0.07, step=15, part=part)
        for part in ("params", "batch_stats")
    }
    for which in ("net", "ema_net"):
        loaded = interop.load_checkpoint(out, variables, which=which)
        jax.tree.map(np.testing.assert_array_equal, loaded, want)


def test_pth_follows_a_torch_template_file_and_loads_into_the_twin(snapshots, tmp_path):
    torch = pytest.importorskip("torch")
    from jema._app.torch_models import TorchDigitsCNN

    folder, variables = snapshots
    template = tmp_path / "template.pth"
    torch.save(TorchDigitsCNN(4).state_dict(), template)
    out = tmp_path / "ema.pth"
    status, stdout, stderr = run(
        "posthoc", str(folder), "--sigma-rel", "0.12", "--out", str(out),
        "--torch-template", str(template),
    )  # fmt: skip
    assert status == 0, stderr
    assert "EMA of sigma_rel 0.12 at step 20" in stdout
    assert "snapshots" in stderr  # the progress bar
    checkpoint = torch.load(out, weights_only=True)
    assert list(checkpoint["ema_net"]) == list(torch.load(template, weights_only=True))
    assert checkpoint["posthoc_sigma_rel"] == 0.12 and checkpoint["posthoc_step"] == 20
    TorchDigitsCNN(4).load_state_dict(checkpoint["ema_net"], strict=True)
    loaded = interop.load_checkpoint(out, variables)
    want = posthoc.reconstruct(folder, 0.12)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], want)


def test_extrapolation_is_a_one_line_warning(snapshots, tmp_path, capsys):
    folder, _ = snapshots
    out = tmp_path / "narrow.safetensors"
    args = ["posthoc", str(folder), "--sigma-rel", "0.03", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("jema posthoc: warning: sigma_rel=0.03 is narrower than every tracked")
    assert err.count("\n") == 1 and out.exists()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--sigma-rel", "0.5", "--out", "x.safetensors"], 2, "--sigma-rel: must be a width in"),
        (["--sigma-rel", "0.07"], 2, "--sigma-rel needs --out FILE"),
        (["--list", "--out", "x.pth"], 2, "--list takes no --out"),
        ([], 2, "one of the arguments --list --sigma-rel is required"),
        (["--sigma-rel", "0.07", "--step", "4", "--out", "{tmp}/x.safetensors"], 1,
         r"no snapshot at step 4; saved steps: [5, 10, 15, 20]"),
        (["--sigma-rel", "0.07", "--step", "12", "--out", "{tmp}/x.safetensors"], 1,
         r"no snapshot at step 12; saved steps: [5, 10, 15, 20]"),
        (["--sigma-rel", "0.07", "--step", "99999999999999999999", "--out", "{tmp}/x.pth"], 1,
         r"no snapshot at step 99999999999999999999; saved steps: [5, 10, 15, 20]"),
        (["--sigma-rel", "1e-300", "--out", "x.safetensors"], 2, "--sigma-rel: must be a width in"),
        (["--sigma-rel", "0.07", "--out", "{tmp}/x.pth", "--torch-template", "{tmp}/no.pth"], 1,
         "no --torch-template file"),
    ],
)  # fmt: skip
def test_bad_settings_exit_2_and_failures_1_with_one_line(
    snapshots, tmp_path, args, status, message
):
    folder, _ = snapshots
    args = [a.format(tmp=tmp_path) for a in args]
    status_got, stdout, stderr = run("posthoc", str(folder), *args)
    assert status_got == status, stderr
    assert stderr.startswith("jema posthoc: ") and stderr.count("\n") == 1, stderr
    assert message in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_fails_with_one_line(tmp_path, capsys):
    assert main(["posthoc", str(tmp_path / "nowhere"), "--list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jema posthoc: no snapshot folder") and err.count("\n") == 1
    assert not (tmp_path / "nowhere").exists()


def test_bench_posthoc_prints_every_row_on_a_tiny_tree(capsys):
    rows = bench_posthoc.run(repeats=1, params=64, leaves=2, snapshots=2)
    assert [row.name[:3] for row in rows] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert all(row.ms > 0 for row in rows)
    assert rows[1].met is not None and rows[0].met is None
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and all(line.count("|") == 6 for line in table)


def test_bench_posthoc_fused_update_matches_a_numpy_replay():
    case = bench_posthoc.power_case([5, 3])
    updates, state, params = (jax.tree.map(np.asarray, x) for x in case.carry)
    for _ in range(3):
        case.carry = case.step(case.carry)
    new = jax.tree.map(np.add, params, updates)
    for width in (0.05, 0.1):
        gamma = jema.sigma_rel_to_gamma(width)
        ema = state[0].emas[repr(width)]
        for t in (1, 2, 3):
            beta = (1 - 1 / t) ** (gamma + 1)
            ema = jax.tree.map(lambda e, n, b=beta: b * e + (1 - b) * n, ema, new)
        got = jema.ema_params(case.carry[1], sigma_rel=width)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, ema)

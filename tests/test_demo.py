"""`jema demo` end to end on a reduced setting: outputs, exports that agree, PyTorch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import interop
import jema
from jema._app.demo import DemoConfig, run
from jema._app.models import DigitsCNN

torch = pytest.importorskip("torch", reason="the demo's .pth and its PyTorch twin need torch")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run(DemoConfig(epochs=2, out=str(out), progress=False)), out


def test_demo_writes_plot_orbax_and_pth_and_the_twin_agrees(plain):
    summary, out = plain
    files = summary["files"]
    assert set(files) == {"plot", "orbax", "pth"}
    with open(files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["torch_agrees"] is True
    history = summary["history"]
    assert len(history.raw) == len(history.ema) == 2
    assert all(0.5 < acc <= 1.0 for acc in history.raw + history.ema)


def test_orbax_checkpoint_and_pth_hold_the_same_ema(plain):
    summary, _ = plain
    steps = 2 * (1348 // 32)
    tx = jema.with_ema(optax.sgd(0.1, momentum=0.9), decay=0.999, total_steps=steps)
    model = DigitsCNN(16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    template = jema.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )
    restored = jema.checkpoint.restore(summary["files"]["orbax"], template)
    assert int(jema.ema_count(restored.opt_state)) == steps
    from_pth = interop.load_checkpoint(summary["files"]["pth"], variables)  # ema_net, as SG does
    ema = restored.ema_variables()
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(from_pth), strict=True):
        np.testing.assert_array_equal(a, b)
    raw = interop.load_checkpoint(summary["files"]["pth"], variables, which="net")
    np.testing.assert_array_equal(raw["params"]["fc"]["kernel"], restored.params["fc"]["kernel"])
    ckpt = torch.load(summary["files"]["pth"], weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["acc"] == pytest.approx(summary["history"].ema[-1])


def test_kd_demo_exports_student_and_teacher_keys(tmp_path):
    summary = run(DemoConfig(epochs=1, kd=True, out=str(tmp_path), progress=False))
    assert summary["torch_agrees"] is True
    assert 0.5 < summary["teacher_accuracy"] <= 1.0
    ckpt = torch.load(summary["files"]["pth"], weights_only=True)
    prefixes = {k.split(".")[0] for k in ckpt["ema_net"]}
    assert prefixes == {"student", "teacher"}
    for key, value in ckpt["net"].items():
        if key.startswith("teacher."):
            assert torch.equal(value, ckpt["ema_net"][key])  # the frozen teacher is not averaged

"""The README's "Coming from ..." table: each row's one-line jema equivalent gives the peer's
numbers (or, where the peer differs, the difference the table names). Checked against the
peer itself where it installs here (optax; timm's ModelEmaV3 from timm's own file), else
against its documented formula."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jema

DECAY = 0.9
STEPS = 12
RNG = np.random.default_rng(0)
TRAJECTORY = np.cumsum(RNG.standard_normal((STEPS, 5)), axis=0).astype(np.float32)


def jema_ema(tx, trajectory=TRAJECTORY):
    """The EMA jema keeps over ``trajectory`` (the weights after each optimizer step), from
    initial weights equal to the first row for a constant run, else zeros."""
    constant = bool((trajectory == trajectory[0]).all())
    state = tx.init(
        {"w": jnp.asarray(trajectory[0]) if constant else jnp.zeros(trajectory.shape[1])}
    )
    for weights in trajectory:
        _, state = tx.update({"w": jnp.zeros_like(weights)}, state, {"w": jnp.asarray(weights)})
    return np.asarray(jema.ema_params(state)["w"], np.float64)


def replay(decay_at, trajectory=TRAJECTORY, initial=None):
    """float64: ema = d * ema + (1 - d) * weights with d = decay_at(n), n = 1, 2, ..."""
    ema = np.zeros(trajectory.shape[1]) if initial is None else initial
    for n, weights in enumerate(trajectory.astype(np.float64), start=1):
        d = decay_at(n)
        ema = d * ema + (1 - d) * weights
    return ema


def test_optax_ema_averages_the_updates_jema_the_weights():
    updates = np.diff(TRAJECTORY, axis=0, prepend=np.zeros((1, 5), np.float32))
    tx = optax.ema(DECAY, debias=False)
    state = tx.init({"w": jnp.zeros(5)})
    for u in updates:
        _, state = tx.update({"w": jnp.asarray(u)}, state)
    np.testing.assert_allclose(state.ema["w"], replay(lambda n: DECAY, updates), rtol=1e-5)
    weights_ema = jema_ema(jema.ema_transform(DECAY, "constant"))
    np.testing.assert_allclose(weights_ema, replay(lambda n: DECAY), rtol=1e-5)
    assert not np.allclose(state.ema["w"], weights_ema, rtol=0.1)


def test_kauldron_ema_params_without_debias_is_jemas_constant():
    # kauldron: new = decay * old + (1 - decay) * (params + updates), old = the initial params
    np.testing.assert_allclose(
        jema_ema(jema.ema_transform(DECAY, "constant")), replay(lambda n: DECAY), rtol=1e-5
    )


def test_kauldron_debias_is_no_average_jemas_threshold_is():
    """kauldron stores the debiased value, ``(d * old + (1 - d) * p) / (1 - d**n)``, and
    feeds it back: its weights sum to more than 1, so a constant run is not kept."""
    constant = np.ones((STEPS, 5), np.float32)
    kauldron = np.ones(5)
    for n in range(1, STEPS + 1):
        kauldron = (DECAY * kauldron + (1 - DECAY)) / (1 - DECAY**n)
    assert kauldron[0] > 2
    np.testing.assert_allclose(jema_ema(jema.ema_transform(DECAY), constant), 1.0, rtol=1e-6)


def test_a_hand_written_nnx_ema_is_jemas_constant():
    ema = {"w": jnp.zeros(5)}
    for weights in TRAJECTORY:
        ema = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, ema, {"w": weights})
    np.testing.assert_allclose(jema_ema(jema.ema_transform(DECAY, "constant")), ema["w"], rtol=1e-5)


def timm_model_ema():
    """timm's own ``timm/utils/model_ema.py``, loaded alone (its package imports torchvision,
    which does not load beside the pinned torch; this file needs torch only)."""
    pytest.importorskip("torch", reason="timm's EMA runs on torch")
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("timm is not installed (.ci/run installs it: pip install --no-deps timm)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "utils" / "model_ema.py"
    module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("timm_options", "jema_options"),
    [
        ({}, {"decay_type": "constant"}),
        (
            {"use_warmup": True, "warmup_gamma": 2.0, "warmup_power": 0.75, "update_after_step": 2},
            {"decay_type": "warmup", "inv_gamma": 2.0, "power": 0.75, "update_after_step": 2},
        ),
    ],
)
def test_timm_model_ema_v3_is_jemas_constant_or_warmup(timm_options, jema_options):
    timm = timm_model_ema()
    import torch

    model = torch.nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = timm.ModelEmaV3(model, decay=DECAY, **timm_options)
    for n, weights in enumerate(TRAJECTORY, start=1):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(weights)[None])
        ema.update(model, step=n if timm_options else None)
    got = ema.module.weight.detach().numpy()[0]
    np.testing.assert_allclose(jema_ema(jema.ema_transform(DECAY, **jema_options)), got, rtol=1e-5)


def ema_pytorch_decay(n, beta, update_after_step, inv_gamma, power, min_value):
    """ema-pytorch's documented ``EMA.get_current_decay`` at its step counter n (1-based)."""
    epoch = max(n - update_after_step - 1, 0)
    if epoch <= 0:
        return 0.0
    value = 1 - (1 + epoch / inv_gamma) ** -power
    return min(max(value, min_value), beta)


def test_ema_pytorch_ema_is_jemas_warmup_and_its_update_every_is_jemas_every_k():
    options = {
        "beta": 0.99,
        "update_after_step": 1,
        "inv_gamma": 1.0,
        "power": 2 / 3,
        "min_value": 0.1,
    }
    expected = replay(lambda n: ema_pytorch_decay(n, **options))
    tx = jema.ema_transform(0.99, "warmup", update_after_step=1, min_decay=0.1)
    np.testing.assert_allclose(jema_ema(tx), expected, rtol=1e-5)
    # update_every=k applies the one-step decay once per k steps: a window k times shorter;
    # jema's every_k_steps=k applies d**k and keeps the window (numbers: test_sparse_updates).


def diffusers_decay(n, decay, use_ema_warmup, inv_gamma=1.0, power=2 / 3, update_after_step=0):
    """diffusers' documented ``EMAModel.get_decay`` at its optimization_step n (1-based)."""
    step = max(0, n - update_after_step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / inv_gamma) ** -power if use_ema_warmup else (1 + step) / (10 + step)
    return min(value, decay)


def test_diffusers_ema_model_with_warmup_is_jemas_warmup():
    expected = replay(lambda n: diffusers_decay(n, 0.999, True))
    np.testing.assert_allclose(jema_ema(jema.ema_transform(0.999, "warmup")), expected, rtol=1e-5)


def test_diffusers_default_is_sgs_threshold_one_step_late_after_a_copy():
    expected = replay(lambda n: diffusers_decay(n, 0.999, False))

    def diffusers_like(count):  # an optax-style schedule of the count (0 at the first update)
        s = jnp.asarray(count, jnp.float32)  # (1 + count) would overflow int32 at the end
        return jnp.where(s == 0, 0.0, jnp.minimum(0.999, (1 + s) / (10 + s)))

    late = jema.ema_transform(diffusers_like, "constant")
    np.testing.assert_allclose(jema_ema(late), expected, rtol=1e-5)
    assert not np.allclose(jema_ema(jema.ema_transform(0.999)), expected, rtol=1e-3)


def test_supergradients_model_ema_is_jemas_ema_transform():
    sg_threshold = lambda n: min(DECAY, (1 + n) / (10 + n))  # noqa: E731  SG's formula
    np.testing.assert_allclose(jema_ema(jema.ema_transform(DECAY)), replay(sg_threshold), rtol=1e-5)


def test_ema_pytorch_post_hoc_ema_is_jemas_power_ema():
    """ema-pytorch's PostHocEMA keeps power-function EMAs; jema's are EDM2's: β_1 = 0."""
    gamma = jema.sigma_rel_to_gamma(0.10)
    expected = replay(lambda n: (1 - 1 / n) ** (gamma + 1))
    np.testing.assert_allclose(jema_ema(jema.power_ema((0.10,))), expected, rtol=1e-5)

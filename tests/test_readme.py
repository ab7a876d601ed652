"""The README's Python examples run as written in an empty folder (with or without torch), the
checkpoint example agrees with PyTorch, and the page stays a newcomer's page."""

import pathlib
import re

import numpy as np
import pytest

import jema

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
CHECKPOINT = next(i for i, block in enumerate(BLOCKS) if "ckpt_best.pth" in block)


def run_block(index, folder, monkeypatch):
    monkeypatch.chdir(folder)
    registry = dict(jema.EMA_DECAY_FUNCTIONS)
    namespace = {}
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    finally:
        jema.EMA_DECAY_FUNCTIONS.clear()
        jema.EMA_DECAY_FUNCTIONS.update(registry)
    return namespace


def test_the_readme_has_its_four_examples_and_fits_a_newcomer():
    assert len(BLOCKS) == 4
    assert len(README.read_bytes()) <= 12_000
    text = README.read_text()
    for spelled_out in ("SuperGradients", "EDM2", "knowledge distillation (KD)"):
        assert spelled_out in text
    for link in re.findall(r"\]\(((?!https?:)[^)]+)\)", text):  # local links lead somewhere
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_in_an_empty_folder(index, tmp_path, monkeypatch):
    run_block(index, tmp_path, monkeypatch)


def test_the_checkpoint_example_gives_the_logits_pytorch_gives(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="the checkpoint example is checked against torch")

    class TorchNet(torch.nn.Module):
        """The PyTorch model the README's Flax twin mirrors."""

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))

    namespace = run_block(CHECKPOINT, tmp_path, monkeypatch)
    ema_net = TorchNet().eval()
    ema_net.load_state_dict(torch.load("ckpt_best.pth", weights_only=True)["ema_net"])
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    flax_logits = namespace["Net"]().apply(namespace["variables"], x)
    with torch.no_grad():
        expected = ema_net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(flax_logits), expected, atol=1e-5)
    back = torch.load("back.pth", weights_only=True)
    TorchNet().load_state_dict(back["ema_net"], strict=True)  # default names match torch's
    assert back["epoch"] == 1

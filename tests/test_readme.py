"""The README's Python examples run as written, and the checkpoint example agrees with PyTorch."""

import pathlib
import re

import numpy as np
import pytest

import jema

torch = pytest.importorskip(
    "torch", reason="the README's checkpoint example is checked against PyTorch"
)

README = pathlib.Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class TorchNet(torch.nn.Module):
    """The PyTorch model the README's Flax twin mirrors."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))


def test_the_readme_has_its_examples():
    assert len(BLOCKS) == 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net, ema_net = TorchNet(), TorchNet()
    for module in ema_net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    torch.save(
        {"net": net.state_dict(), "ema_net": ema_net.state_dict(), "epoch": 3}, "ckpt_best.pth"
    )
    registry = dict(jema.EMA_DECAY_FUNCTIONS)  # an example registers "linear"
    namespace = {}
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    finally:
        jema.EMA_DECAY_FUNCTIONS.clear()
        jema.EMA_DECAY_FUNCTIONS.update(registry)
    if "ckpt_best.pth" in BLOCKS[index]:
        ema_net.eval()
        with torch.no_grad():
            expected = ema_net(torch.zeros(4, 1, 8, 8)).numpy()
        np.testing.assert_allclose(np.asarray(namespace["logits"]), expected, atol=1e-5)
        back = torch.load("back.pth", weights_only=True)
        TorchNet().load_state_dict(back["ema_net"], strict=True)  # default names match torch's
        assert back["epoch"] == 1

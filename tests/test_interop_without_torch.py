"""interop without PyTorch: ``import interop`` and reading any file leave it unimported, ``.pth``
and safetensors files load, save and inspect with numpy alone, and what needs it (``nn.Module``
templates, ``flax_to_torch``) says how to install it."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

# Run before anything else in the child: every ``import torch`` fails as if it were absent.
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
"""

CHECKS = """
import ml_dtypes, numpy as np, jax.numpy as jnp
import interop

rng = np.random.default_rng(0)
net = {"params": {
    "conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(ml_dtypes.bfloat16),
             "bias": rng.standard_normal(4).astype(np.float32)},
    "fc": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
           "bias": np.arange(5, dtype=np.int32)},
}}
ema = {"params": {**net["params"], "fc": {**net["params"]["fc"], "bias": np.ones(5, np.int32)}}}

def same(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()

for path in (SAFE, PTH_OUT):
    interop.save_checkpoint(path, net=net, ema_net=ema, epoch=3)
    for which, want in (("net", net), ("ema_net", ema)):
        back = interop.load_checkpoint(path, net, which=which)
        for module in ("conv", "fc"):
            for leaf in ("kernel", "bias"):
                got = back["params"][module][leaf]
                assert same(got, want["params"][module][leaf]), (path, which, module, leaf)
    report = interop.inspect_checkpoint(path).splitlines()
    assert report[1] == "net: 4 tensors, 101 parameters, dtypes bfloat16 x1, float32 x2, int32 x1"
    assert "relative distance |net - ema_net| / |net| per layer:" in report, report

# A template given as a file or as its state_dict of numpy arrays: its keys, order and dtypes.
read = interop.read_checkpoint(PTH_OUT)
assert read["epoch"] == 3
assert list(read["net"]) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
template = {"fc.bias": np.zeros(5, np.int32), "fc.weight": np.zeros((5, 4), np.float32)}
interop.write_checkpoint(TEMPLATE, {"net": template, "ema_net": template})
for given in (TEMPLATE, template):
    interop.save_checkpoint(PTH_OUT, net={"params": {"fc": net["params"]["fc"]}},
                            torch_template=given)
    fc = interop.read_checkpoint(PTH_OUT)["net"]
    assert list(fc) == ["fc.bias", "fc.weight"]
    assert same(fc["fc.weight"], np.asarray(net["params"]["fc"]["kernel"]).T)

state_dict = {"fc.weight": np.ones((5, 4), np.float32), "fc.bias": np.zeros(5, np.int32)}
filled = interop.torch_to_flax(state_dict, {"params": {"fc": net["params"]["fc"]}})
assert same(filled["params"]["fc"]["kernel"], np.ones((4, 5), np.float32))

def refused(action, *names):
    try:
        action()
    except ImportError as e:
        assert 'pip install "jema[torch]"' in str(e) and all(n in str(e) for n in names), e
    else:
        raise AssertionError(f"no ImportError naming {names}")

refused(lambda: interop.flax_to_torch(net), "flax_to_torch")
assert "torch" not in sys.modules
print("ok")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_interop_does_not_import_torch() -> None:
    done = _run("import sys, interop\nassert interop.__jema__\nprint('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_pth_and_safetensors_work_without_torch_and_flax_to_torch_asks_for_it(tmp_path) -> None:
    paths = {"SAFE": tmp_path / "ckpt.safetensors", "PTH_OUT": tmp_path / "out.pth"}
    paths["TEMPLATE"] = tmp_path / "template.pth"
    names = "".join(f"{k} = {str(v)!r}\n" for k, v in paths.items())
    done = _run(NO_TORCH + names + textwrap.dedent(CHECKS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


READS = """
import sys, interop
for path in PATHS:
    interop.inspect_checkpoint(path)
    checkpoint = interop.read_checkpoint(path)
    interop.write_checkpoint(OUT, checkpoint)
    assert "net" in checkpoint and interop.read_checkpoint(OUT).keys() == checkpoint.keys()
print("torch" in sys.modules)
"""


def test_reading_and_writing_pth_files_never_imports_torch_even_where_it_is_installed(tmp_path):
    seeds = pathlib.Path(__file__).parent / "data" / "interop_bad" / "seeds"
    paths = [str(seeds / "sections.pth"), str(seeds / "sections_legacy.pth")]  # torch.save's
    names = f"PATHS = {paths!r}\nOUT = {str(tmp_path / 'out.pth')!r}\n"
    done = _run(names + textwrap.dedent(READS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"

"""Tensors without a numpy twin (meta, sparse, quantized, complex32): a ``.pth`` file holding one
is refused naming the file and the globals it needs; in memory, the key is named in the report."""

from __future__ import annotations

import warnings

import pytest
import torch

import interop
from tests.test_interop_bad_files import TEMPLATE

GOOD = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
GOOD |= {"bn.weight": torch.ones(2), "bn.bias": torch.zeros(2)}
GOOD |= {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
CASES = [
    (lambda: torch.empty(2, device="meta"), "a meta tensor has no dense data",
     "torch._utils._rebuild_meta_tensor_no_storage"),
    (lambda: torch.ones(2).to_sparse(), "a sparse_coo tensor has no dense data",
     "torch._utils._rebuild_sparse_tensor, torch.serialization._get_layout"),
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
     "unsupported tensor dtype torch.qint8",
     "torch.QInt8Storage, torch._utils._rebuild_qtensor, torch.per_tensor_affine"),
    (lambda: torch.ones(2, dtype=torch.complex32), "unsupported tensor dtype torch.complex32",
     "torch.complex32"),
]  # fmt: skip


def _make(make):
    with warnings.catch_warnings():  # quantized tensors are deprecated
        warnings.simplefilter("ignore", UserWarning)
        return make()


@pytest.mark.parametrize(("make", "message", "names"), CASES, ids=["meta", "sparse", "q", "c32"])
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")  # quantized
def test_a_file_with_one_is_refused_naming_the_globals_it_needs(tmp_path, make, message, names):
    path = tmp_path / "odd.pth"
    torch.save({"net": {**GOOD, "fc.bias": _make(make)}, "ema_net": GOOD}, path)
    for read in (interop.inspect_checkpoint, lambda p: interop.load_checkpoint(p, TEMPLATE)):
        with pytest.raises(ValueError) as e:
            read(path)
        assert str(e.value).startswith(f"{path} needs globals this reader does not allow: {names}.")


@pytest.mark.parametrize(("make", "message", "names"), CASES, ids=["meta", "sparse", "q", "c32"])
def test_in_memory_the_key_is_named_in_the_report(make, message, names):
    state_dict = {**GOOD, "fc.bias": _make(make)}
    with pytest.raises(ValueError) as e:
        interop.torch_to_flax(state_dict, TEMPLATE)
    assert str(e.value).startswith("the state_dict does not match:\n1 dtypes:\n")
    assert f"  fc.bias: {message}" in str(e.value)
    report = interop.torch_to_flax(state_dict, TEMPLATE, strict=False).report
    assert report.dtypes == (str(e.value).split("\n")[2].strip(),)

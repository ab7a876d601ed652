"""A present ``net``/``ema_net`` that is not a state_dict is refused, never skipped for the
other section."""

from __future__ import annotations

import numpy as np
import pytest

from interop._schema import pick_section

NET = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}


@pytest.mark.parametrize(
    "broken", [None, [NET["fc.bias"]], (NET["fc.bias"],), NET["fc.bias"], 3], ids=repr
)
@pytest.mark.parametrize("which", ["auto", "ema_net"])
def test_an_ema_net_that_is_not_a_state_dict_is_refused_naming_file_and_type(broken, which):
    checkpoint = {"net": NET, "ema_net": broken, "epoch": 3}
    message = f"ckpt.pth: 'ema_net' is a {type(broken).__name__}, not a state_dict"
    with pytest.raises(ValueError, match=message):
        pick_section(checkpoint, which, "ckpt.pth")


@pytest.mark.parametrize("broken", [None, [], "weights"], ids=repr)
def test_a_net_that_is_not_a_state_dict_is_refused_even_for_ema_net(broken):
    with pytest.raises(ValueError, match="'net' is a"):
        pick_section({"net": broken, "ema_net": NET}, "ema_net", "ckpt.pth")


def test_a_bare_state_dict_with_a_tensor_named_net_is_still_a_state_dict():
    bare = {"net": np.ones(2, np.float32), "head.bias": np.zeros(2, np.float32)}
    assert pick_section(bare, "auto", "ckpt.pth") is bare
    np.testing.assert_array_equal(pick_section({"net": NET}, "auto", "ckpt.pth")["fc.weight"], 1)

"""The drop-in quantizer layers do not check their input for NaN/Inf by default: the check is a
host sync on every forward on a GPU (vector-quantize-pytorch does not check). It stays an
option (check_finite=True)."""

import importlib

import pytest
import torch

import lgvq

LAYERS = {
    "vector_quantizer": lambda **kw: lgvq.VectorQuantizer(8, 4, backend="reference", **kw),
    "taming": lambda **kw: lgvq.TamingVectorQuantizer(4, 8, 0.25, backend="reference", **kw),
    "clustered": lambda **kw: lgvq.ClusteredVectorQuantizer(8, 4, backend="reference", **kw),
    "residual": lambda **kw: lgvq.ResidualVQ(8, 2, 4, backend="reference", **kw),
}


class CheckCalled(Exception):
    pass


def _forbid_check(*args, **kwargs):
    raise CheckCalled


def _input(module_name: str) -> torch.Tensor:
    # taming takes feature maps [B, e_dim, H, W]; the others [B, N, dim]
    return torch.randn(2, 8, 2, 3) if module_name == "taming" else torch.randn(2, 3, 8)


@pytest.mark.parametrize("module_name", sorted(LAYERS))
def test_default_forward_does_not_check_finite(monkeypatch, module_name):
    module = importlib.import_module(f"lgvq.quantizers.{module_name}")
    monkeypatch.setattr(module, "check_all_finite", _forbid_check)
    layer = LAYERS[module_name]().eval()
    assert layer.check_finite is False
    layer(_input(module_name))  # would raise CheckCalled if the check ran


@pytest.mark.parametrize("module_name", sorted(LAYERS))
def test_check_finite_option_still_checks(module_name):
    layer = LAYERS[module_name](check_finite=True).eval()
    x = _input(module_name)
    x.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)

"""The training optimizers' multi-tensor (foreach) updates against PyTorch's per-parameter loop:
bitwise the same weights, so switching to them moved no trained result or committed figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lgvq.config import build_config
from lgvq.downstream.tasks import DownstreamConfig, build_optimizer
from lgvq.training import adam


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # odd sizes, a mix of matrices, vectors and a 4-d kernel (like a tokenizer and its heads)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.GroupNorm(1, 5), nn.Flatten(),
                         nn.Linear(5 * 5 * 5, 17), nn.LayerNorm(17), nn.Linear(17, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 6) -> list:
    generator = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        x = torch.randn(4, 3, 7, 7, generator=generator).to(dtype)
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # a schedule, as training's cosine one
            group["lr"] = group["initial_lr"] * (0.5 + 0.5 * (steps - step) / steps)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _with_initial_lr(optimizer):
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def _loop_twin(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """The same optimizer class and settings on ``model``'s parameters (same grouping), with the
    per-parameter loop instead of the multi-tensor update."""
    params = list(model.parameters())
    groups, at = [], 0
    for group in optimizer.param_groups:
        size = len(group["params"])
        options = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
        groups.append({**options, "params": params[at:at + size], "foreach": False})
        at += size
    return type(optimizer)(groups)


def _compare_with_the_loop(fast: torch.optim.Optimizer, model: nn.Module, seed: int,
                           dtype: torch.dtype) -> None:
    twin_model = _model(seed).to(dtype)
    loop = _loop_twin(fast, twin_model)
    weights_fast = _train(model, _with_initial_lr(fast))
    weights_loop = _train(twin_model, _with_initial_lr(loop))
    assert all(group["foreach"] for group in fast.param_groups)
    assert not any(group["foreach"] for group in loop.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(weights_fast, weights_loop))
    # the run moved the weights (a test of equal no-ops would pass trivially)
    assert not torch.equal(weights_fast[0], _model(seed).to(dtype)[0].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_adam_equals_the_per_parameter_loop_bitwise(dtype):
    config = build_config("shapes")
    model = _model(0).to(dtype)
    tokenizer, heads = list(model[:3].parameters()), list(model[3:].parameters())
    fast = adam([{"params": tokenizer}, {"params": heads, "lr": 3e-3}],
                lr=config.learning_rate, betas=tuple(config.adam_betas))
    _compare_with_the_loop(fast, model, 0, dtype)


def test_downstream_adamw_equals_the_per_parameter_loop_bitwise():
    model = _model(1)
    _compare_with_the_loop(build_optimizer(DownstreamConfig(), model), model, 1, torch.float32)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_adam_equals_the_per_parameter_loop_bitwise(dtype):
    config = build_config("shapes")
    made = []
    for factory in (adam, lambda params, **kw: torch.optim.Adam(params, foreach=False, **kw)):
        model = _model(0).to(dtype)
        tokenizer, heads = list(model[:3].parameters()), list(model[3:].parameters())
        optimizer = _with_initial_lr(factory(
            [{"params": tokenizer}, {"params": heads, "lr": 3e-3}],
            lr=config.learning_rate, betas=tuple(config.adam_betas)))
        made.append((optimizer, _train(model, optimizer)))
    (fast, weights_fast), (loop, weights_loop) = made
    assert all(group["foreach"] for group in fast.param_groups)
    assert not any(group["foreach"] for group in loop.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(weights_fast, weights_loop))
    # the run moved the weights (a test of equal no-ops would pass trivially)
    assert not torch.equal(weights_fast[0], _model(0).to(dtype)[0].weight)


def test_downstream_adamw_equals_the_per_parameter_loop_bitwise():
    config = DownstreamConfig()
    made = []
    for foreach in (True, False):
        model = _model(1)
        if foreach:
            optimizer = build_optimizer(config, model)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                          betas=(0.9, 0.95), weight_decay=config.weight_decay,
                                          foreach=False)
        made.append((optimizer, _train(model, _with_initial_lr(optimizer))))
    (fast, weights_fast), (loop, weights_loop) = made
    assert fast.param_groups[0]["foreach"] and not loop.param_groups[0]["foreach"]
    assert all(torch.equal(a, b) for a, b in zip(weights_fast, weights_loop))

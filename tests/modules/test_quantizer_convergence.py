"""Convergence: a tiny autoencoder with a VectorQuantizer bottleneck, trained on a mixture of
Gaussians with every usable backend, reaches the reconstruction loss and codebook usage it
reaches with the reference backend. The Triton interpreter (~1 s per step on CPU) runs a short
prefix of the same training and must follow the reference trajectory step by step."""

import functools

import pytest
import torch
from torch import nn

import lgvq
from tests.utils import usable_backends

OPS = ("nearest_code", "quantize_straight_through", "quantize_straight_through_backward",
       "codebook_statistics", "codebook_ema_update_")
STEPS, INTERPRETER_STEPS = 120, 3
MODES = {
    "ema": dict(kmeans_init=True, threshold_ema_dead_code=1.0),
    "learnable": dict(learnable_codebook=True, threshold_ema_dead_code=1.0),
}


BACKENDS = ["auto"] + [name for name in ("native", "triton")
                       if all(name in usable_backends(op) for op in OPS)]


def mixture(count, generator):
    centers = torch.randn(8, 8, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.randint(0, 8, (count,), generator=generator)
    return centers[labels] + 0.1 * torch.randn(count, 8, generator=generator)


@functools.lru_cache(maxsize=None)
def train(backend, mode, steps):
    """Returns (per-step training losses, final eval reconstruction loss, eval usage)."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    decoder = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
    quantizer = lgvq.VectorQuantizer(4, 16, commitment_weight=0.25, backend=backend,
                                     **MODES[mode])
    parameters = [*encoder.parameters(), *decoder.parameters(), *quantizer.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = mixture(128, generator)
        quantized, _, vq_loss = quantizer(encoder(x)[:, None])
        loss = ((decoder(quantized[:, 0]) - x) ** 2).mean() + vq_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    quantizer.eval()
    x = mixture(1024, torch.Generator().manual_seed(7))
    with torch.no_grad():
        quantized, _, _, usage = quantizer(encoder(x)[:, None], return_usage=True)
        reconstruction = ((decoder(quantized[:, 0]) - x) ** 2).mean().item()
    return losses, reconstruction, usage.used_fraction.item()


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_training_converges(mode):
    losses, reconstruction, used = train("reference", mode, STEPS)
    assert reconstruction < 0.25 * sum(losses[:5]) / 5
    assert used >= 0.5  # at least the 8 clusters hold a code each


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_converges_like_reference(backend, mode):
    if backend == "triton":  # interpreted: follow the reference for the first steps
        losses, _, _ = train(backend, mode, INTERPRETER_STEPS)
        reference_losses, _, _ = train("reference", mode, INTERPRETER_STEPS)
        torch.testing.assert_close(losses, reference_losses, rtol=1e-4, atol=1e-6)
        return
    losses, reconstruction, used = train(backend, mode, STEPS)
    reference_losses, reference_reconstruction, reference_used = train("reference", mode, STEPS)
    assert reconstruction == pytest.approx(reference_reconstruction, rel=0.25, abs=0.02)
    assert used == pytest.approx(reference_used, abs=0.13)  # within two codes of sixteen

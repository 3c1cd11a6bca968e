"""Shared helpers for the model tests: a tiny nearest-neighbour quantizer standing in for
lgvq.VectorQuantizer (same interface: ``quantized, indices, loss = quantizer(x)`` with x
``[B, N, D]`` channel-last, plus ``get_output_from_indices``)."""

import pytest
import torch
from torch import nn

from lgvq.models import BackboneConfig


class NearestNeighbourQuantizer(nn.Module):
    """Plain VQ: nearest code by squared distance, straight-through output, taming-style loss
    ``||sg(x) - e||^2 + commitment * ||x - sg(e)||^2``."""

    def __init__(self, dim: int, codebook_size: int, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))
        self.commitment_weight = commitment_weight

    def forward(self, x: torch.Tensor):
        distances = torch.cdist(x.detach(), self.codebook.detach().expand(x.shape[0], -1, -1))
        indices = distances.argmin(dim=-1)  # [B, N]
        codes = self.codebook[indices]  # [B, N, D]
        loss = (codes - x.detach()).square().mean() + self.commitment_weight * (
            x - codes.detach()
        ).square().mean()
        quantized = x + (codes - x).detach()
        return quantized, indices, loss

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices]


@pytest.fixture
def make_quantizer():
    def make(dim: int, codebook_size: int = 32, seed: int = 0) -> NearestNeighbourQuantizer:
        torch.manual_seed(seed)
        return NearestNeighbourQuantizer(dim, codebook_size)

    return make


# a backbone small enough for many tests: 32x32 -> 8x8 tokens
@pytest.fixture
def micro_backbone() -> BackboneConfig:
    return BackboneConfig(image_size=32, base_channels=8, channel_multipliers=(1, 2, 2),
                          num_res_blocks=1, attention_resolutions=(16,), z_channels=16,
                          norm_groups=4)


@pytest.fixture(autouse=True)
def single_intra_op_thread():
    """These tests use tiny tensors, where two OpenMP threads gain little and, on a busy
    machine, lose a lot: tests/models took 78 s with 2 threads and 11 s with 1 thread at a load
    average of ~6 on 2 cores. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

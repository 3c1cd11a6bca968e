"""A training script written for vector-quantize-pytorch, as its README shows it, runs on lgvq
with only the import changed: the same seed gives the same initial codebook, and every step the
same indices, outputs, losses and input gradients, over the README's documented options (k-means
init and dead-code replacement draw different random rows, so they are left out)."""

import pytest
import torch

pytest.importorskip("vector_quantize_pytorch")

SCRIPT = """
import torch
from vector_quantize_pytorch import {name}

torch.manual_seed(0)
vq = {name}({arguments})
steps = []
for step in range(3):
    x = torch.randn({shape}, requires_grad=True)
    quantized, indices, commit_loss = vq(x)
    (quantized.square().mean() + commit_loss.sum()).backward()
    steps.append((quantized.detach(), indices, commit_loss.detach(), x.grad))
"""

OURS = {"VectorQuantize": "from lgvq import VectorQuantizer as VectorQuantize",
        "ResidualVQ": "from lgvq import ResidualVQ"}

# (class, constructor arguments, input shape): the README's examples, at a tenth of the size
EXAMPLES = {
    "basic": ("VectorQuantize", "dim=32, codebook_size=64, decay=0.8, commitment_weight=1.", "1, 128, 32"),
    "lower_codebook_dim": ("VectorQuantize", "dim=32, codebook_size=64, codebook_dim=8", "1, 128, 32"),
    "cosine_sim": ("VectorQuantize", "dim=32, codebook_size=64, use_cosine_sim=True", "1, 128, 32"),
    "multi_head": ("VectorQuantize", "dim=32, codebook_dim=8, heads=4, separate_codebook_per_head=True, codebook_size=64", "1, 128, 32"),
    "shared_heads": ("VectorQuantize", "dim=32, codebook_dim=16, heads=2, codebook_size=64", "1, 128, 32"),
    "image_fmap": ("VectorQuantize", "dim=32, codebook_size=64, accept_image_fmap=True", "1, 32, 8, 8"),
    "channel_first": ("VectorQuantize", "dim=32, codebook_size=64, channel_last=False", "1, 32, 128"),
    "straight_through": ("VectorQuantize", "dim=32, codebook_size=64, rotation_trick=False", "1, 128, 32"),
    "residual": ("ResidualVQ", "dim=32, num_quantizers=4, codebook_size=64", "1, 128, 32"),
    "residual_shared": ("ResidualVQ", "dim=32, num_quantizers=3, codebook_size=64, shared_codebook=True", "1, 128, 32"),
    "residual_projected": ("ResidualVQ", "dim=32, num_quantizers=3, codebook_dim=8, codebook_size=64", "1, 128, 32"),
}


def run(script: str) -> list:
    namespace: dict = {}
    exec(compile(script, "<vector-quantize-pytorch README script>", "exec"), namespace)
    return namespace["steps"]


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_readme_script_with_only_the_import_changed(example):
    name, arguments, shape = EXAMPLES[example]
    script = SCRIPT.format(name=name, arguments=arguments, shape=shape)
    theirs = run(script)
    ours = run(script.replace(f"from vector_quantize_pytorch import {name}", OURS[name]))
    if "shared_codebook" in arguments:
        # the first step only: the shared codebook's EMA then differs on purpose (lgvq sums the
        # stages' statistics and decays once per step, vector-quantize-pytorch once per stage)
        ours, theirs = ours[:1], theirs[:1]
    for step, (mine, peer) in enumerate(zip(ours, theirs)):
        quantized, indices, loss, grad = mine
        assert torch.equal(indices, peer[1]), f"indices differ at step {step}"
        torch.testing.assert_close(quantized, peer[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(loss.sum(), peer[2].sum(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, peer[3], rtol=1e-5, atol=1e-6)

"""build_quantizer: the one place where a quantizer kind and its loss weights become a module.

The tokenizer builders (lgvq.models.build_vqvae / build_vqgan) call it with the keyword
arguments of ``VQModelConfig.quantizer_kwargs``; training fills those from its ``TrainConfig``.
The settings that are not a user's choice (k-means start of the EMA codebook, no dead-code
re-seeding for a learnable one) are decided here and nowhere else.
"""

from __future__ import annotations

from torch import nn

from lgvq.quantizers.clustered import ClusteredVectorQuantizer
from lgvq.quantizers.vector_quantizer import VectorQuantizer

__all__ = ["QUANTIZER_KINDS", "TAMING_LEGACY_WEIGHTS", "TAMING_QUANTIZER_KWARGS",
           "build_quantizer"]

QUANTIZER_KINDS = ("ema", "learnable", "cvq")

# LG-VQ's official code quantizes with taming's VectorQuantizer2(beta=0.25, legacy=True):
# loss = |x - sg(e)|^2 + 0.25 |sg(x) - e|^2, i.e. commitment 1.0 and codebook 0.25 (the VQ-VAE
# paper's weighting is the other way round).
TAMING_LEGACY_WEIGHTS: dict[str, float] = {"commitment_weight": 1.0, "codebook_weight": 0.25}

# The quantizer of LG-VQ's VQGAN: a learnable codebook (no EMA) with taming's legacy weights.
TAMING_QUANTIZER_KWARGS: dict = {"kind": "learnable", **TAMING_LEGACY_WEIGHTS}

# k-means iterations on the first training batch of an EMA codebook: enough to spread the codes
# over the data at CPU scale, cheap next to one training step.
_KMEANS_ITERATIONS = 5


def build_quantizer(kind: str, dim: int, codebook_size: int, *, commitment_weight: float,
                    codebook_weight: float, ema_decay: float | None = None,
                    dead_code_threshold: float | None = None,
                    backend: str = "auto") -> nn.Module:
    """The quantizer of a VQ tokenizer, taking ``[B, h*w, dim]`` channel-last rows.

    kind:
      "ema": ``VectorQuantizer`` with an EMA codebook (decay ``ema_decay``) started by k-means
        on the first training batch; codes whose EMA count falls under ``dead_code_threshold``
        are re-seeded from the batch. Loss: commitment_weight * |x - sg(e)|^2.
      "learnable": ``VectorQuantizer`` with a codebook trained by the loss
        commitment_weight * |x - sg(e)|^2 + codebook_weight * |sg(x) - e|^2 (taming's VQGAN
        with :data:`TAMING_LEGACY_WEIGHTS`).
      "cvq": ``ClusteredVectorQuantizer`` (CVQ-VAE's online clustered codebook), same loss.
    ema_decay and dead_code_threshold are needed by (and only read for) "ema".
    """
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"quantizer must be one of {QUANTIZER_KINDS}, got {kind!r}")
    if kind == "cvq":
        return ClusteredVectorQuantizer(dim=dim, codebook_size=codebook_size,
                                        commitment_weight=commitment_weight,
                                        codebook_weight=codebook_weight, backend=backend)
    if kind == "learnable":
        return VectorQuantizer(dim=dim, codebook_size=codebook_size, learnable_codebook=True,
                               rotation_trick=False, ema_update=False, commitment_weight=commitment_weight,
                               codebook_weight=codebook_weight, backend=backend)
    if ema_decay is None or dead_code_threshold is None:
        raise ValueError("the ema quantizer needs ema_decay and dead_code_threshold")
    # straight-through, as LG-VQ and taming train (rotation_trick would default on)
    return VectorQuantizer(dim=dim, codebook_size=codebook_size, decay=ema_decay,
                           rotation_trick=False, ema_update=True, commitment_weight=commitment_weight,
                           codebook_weight=codebook_weight,
                           threshold_ema_dead_code=dead_code_threshold, kmeans_init=True,
                           kmeans_iters=_KMEANS_ITERATIONS, backend=backend)

"""Quantizer layer: one training step (forward + backward + EMA update) and inference (indices
only) of lgvq.VectorQuantizer on each backend, against vector-quantize-pytorch's VectorQuantize
with the same settings (rotation trick off, EMA, decay 0.8, commitment weight 1).

Shape dict: {"N": vectors per step, "K": codes, "D": dim, "mode": "train" | "infer"}.
Inputs: the nearest-code family's vectors near codes: codebook ~ N(0, 1) copied into every
layer; x = a random code plus N(0, 0.3^2) noise, shaped [1, N, D] (channel-last),
requires_grad in "train" mode.

Providers:
  lgvq-native / lgvq-reference / lgvq-triton   lgvq.VectorQuantizer(..., backend=name)
  vqp                                           vector_quantize_pytorch.VectorQuantize
"""

from __future__ import annotations

import torch

from benchmarks import harness
from benchmarks.nearest_code import input_bytes, vectors_near_codes

SHAPE_SETS = {
    "quick": [{"N": 4096, "K": 512, "D": 64, "mode": "train"},
              {"N": 4096, "K": 512, "D": 64, "mode": "infer"}],
    "full": [{"N": 16384, "K": 1024, "D": 256, "mode": "train"},
             {"N": 16384, "K": 16384, "D": 256, "mode": "train"},
             {"N": 16384, "K": 1024, "D": 256, "mode": "infer"},
             {"N": 16384, "K": 16384, "D": 256, "mode": "infer"}],
    "gpu": [{"N": 16384, "K": 8192, "D": 256, "mode": "train"},
            {"N": 16384, "K": 16384, "D": 256, "mode": "train"}],
    "bench": [{"N": 4096, "K": 1024, "D": 256, "mode": "train"}],
}


SHAPE_FORMAT = harness.ShapeFormat("{N}x{K}x{D}[:{mode}]", label="{N}x{K}x{D} {mode}",
                                   words={"mode": ("train", "infer")})


def make_inputs(shape: dict, device: torch.device, dtype: str, seed: int = 0):
    """(x [1, N, D] in the dtype's storage type, codebook [K, D] float32 like the layers')."""
    x, codebook = vectors_near_codes(shape["N"], shape["K"], shape["D"], seed)
    return x[None].to(device=device, dtype=harness.torch_dtype(dtype)), codebook.to(device)


def _step(layer, x: torch.Tensor, mode: str):
    if mode == "infer":
        layer.eval()

        def infer():
            with torch.no_grad():
                return layer(x)[1]

        return infer
    layer.train()
    x = x.detach().requires_grad_(True)

    def train_step():
        quantized, _, loss = layer(x)
        (quantized.sum() * 1e-3 + loss.sum()).backward()
        return loss

    return train_step


def _targets(rows):
    by_case = harness.rows_by_case(rows)
    targets = []
    for label, at_least in (("16384x1024x256 train", 6), ("16384x16384x256 train", 4)):
        found = next((case for (shape, _), case in by_case.items() if shape == label), {})
        targets.append(harness.ratio_target(
            f"training step >= {at_least}x faster than vector-quantize-pytorch at {label}: "
            "vqp / lgvq", found, "vqp", "lgvq-native", at_least=at_least, where=label))
    return targets


FAMILY = harness.register(harness.OpFamily(
    name="quantizer", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT, baseline="vqp", targets=_targets))


def _lgvq_factory(backend: str):
    def factory(shape: dict, device: torch.device, dtype: str):
        import lgvq

        x, codebook = make_inputs(shape, device, dtype)
        layer = lgvq.VectorQuantizer(dim=shape["D"], codebook_size=shape["K"], decay=0.8,
                                     commitment_weight=1.0, check_finite=False,
                                     rotation_trick=False,  # the peer runs plain STE here too
                                     backend=backend).to(device)
        with torch.no_grad():  # [C=1, K, D] codebook and EMA sums, like vqp's
            layer.codebooks.copy_(codebook[None])
            layer.embed_sum.copy_(codebook[None])
        return _step(layer, x, shape["mode"])

    return factory


for _backend in ("native", "triton", "reference"):
    FAMILY.provider(f"lgvq-{_backend}", f"lgvq {_backend}",
                    available=harness.lgvq_backend_available(
                        _backend, "quantize_straight_through"))(_lgvq_factory(_backend))


@FAMILY.provider("vqp", "vector-quantize-pytorch",
                 available=harness.importable("vector_quantize_pytorch", "vector-quantize-pytorch"),
                 extra_bytes=lambda shape, dtype: 4 * 4 * shape["N"] * shape["K"])
def vqp_layer(shape: dict, device: torch.device, dtype: str):
    from vector_quantize_pytorch import VectorQuantize

    x, codebook = make_inputs(shape, device, dtype)
    layer = VectorQuantize(dim=shape["D"], codebook_size=shape["K"], decay=0.8,
                           commitment_weight=1.0, rotation_trick=False).to(device)
    with torch.no_grad():
        layer._codebook.embed.copy_(codebook[None])
        layer._codebook.embed_avg.copy_(codebook[None])
    return _step(layer, x, shape["mode"])

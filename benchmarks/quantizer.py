"""Quantizer layer: one training step (forward + backward + EMA update) and inference (indices
only) of lgvq.VectorQuantizer on each backend, against vector-quantize-pytorch's VectorQuantize
with the same settings (rotation trick off, EMA, decay 0.8, commitment weight 1).

Shape dict: {"N": vectors per step, "K": codes, "D": dim, "mode": "train" | "infer"}.
Inputs: codebook ~ N(0, 1) copied into every layer; x = a random code plus N(0, 0.3^2) noise,
shaped [1, N, D] (channel-last), requires_grad in "train" mode.

Providers:
  lgvq-native / lgvq-reference / lgvq-triton   lgvq.VectorQuantizer(..., backend=name)
  vqp                                           vector_quantize_pytorch.VectorQuantize
"""

from __future__ import annotations

import re

import torch

from benchmarks import harness

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


def shape_label(shape: dict) -> str:
    return f"{shape['N']}x{shape['K']}x{shape['D']} {shape.get('mode', 'train')}"


def parse_shape(text: str) -> dict:
    match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*(?::\s*(train|infer))?\s*", text)
    if not match:
        raise ValueError(f"quantizer shape {text!r}: write NxKxD or NxKxD:infer")
    n, k, d, mode = match.groups()
    return {"N": int(n), "K": int(k), "D": int(d), "mode": mode or "train"}


def input_bytes(shape: dict, dtype: str) -> int:
    return (shape["N"] + shape["K"]) * shape["D"] * harness.element_size(dtype)


def make_inputs(shape: dict, device: torch.device, dtype: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(shape["K"], shape["D"], generator=generator)
    x = codebook[torch.randint(0, shape["K"], (shape["N"],), generator=generator)]
    x = x + 0.3 * torch.randn(shape["N"], shape["D"], generator=generator)
    storage = harness.torch_dtype(dtype)
    return x[None].to(device=device, dtype=storage), codebook.to(device)


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
    for n, k, d in ((16384, 1024, 256), (16384, 16384, 256)):
        label = f"{n}x{k}x{d} train"
        found = next((v for (s, _), v in by_case.items() if s == label), {})
        targets.append(harness.ratio_target(
            f"training step >= 4x faster than vector-quantize-pytorch at {label}: vqp / lgvq",
            found.get("vqp"), found.get("lgvq-native"), at_least=4))
    return targets


FAMILY = harness.register(harness.OpFamily(
    name="quantizer", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_label=shape_label, parse_shape=parse_shape, baseline="vqp", targets=_targets))


def _lgvq_factory(backend: str):
    def factory(shape: dict, device: torch.device, dtype: str):
        import lgvq

        x, codebook = make_inputs(shape, device, dtype)
        layer = lgvq.VectorQuantizer(dim=shape["D"], codebook_size=shape["K"], decay=0.8,
                                     commitment_weight=1.0, check_finite=False,
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


def _vqp_available(device: torch.device) -> tuple[bool, str]:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as error:
        return False, f"vector-quantize-pytorch is not installed ({error})"
    return True, ""


@FAMILY.provider("vqp", "vector-quantize-pytorch", available=_vqp_available,
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

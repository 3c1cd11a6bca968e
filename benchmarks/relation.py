"""Relation alignment loss (LG-VQ's Relationship Alignment Module): forward + backward of
lgvq_kernels.relation_alignment_loss against the reference composition of PyTorch ops and
against the paper code's per-word Python loop.

Shape dict: {"B": images, "L": words per caption, "M": visual positions, "C": text width}.
Inputs (seeded): words, visual tokens and projected codes ~ N(0, 1); 25 % of the word slots are
padding. The timed function computes the loss and its gradient w.r.t. the codes (the only input
with a gradient: the targets are under stop-gradient and the argmax is hard).

Providers:
  lgvq-native / lgvq-triton / lgvq-reference   relation_alignment_loss(..., backend=name)
  paper-loop   the public code's structure: for each image, for each word, argmax over the
               positions, gather, normalise; stack, Gram matrices and MSE, autograd backward
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from benchmarks import harness

SHAPE_SETS = {
    "quick": [{"B": 16, "L": 30, "M": 64, "C": 384}],
    "full": [{"B": 16, "L": 30, "M": 64, "C": 384},  # the shapes demo (MiniLM, 8x8 tokens)
             {"B": 8, "L": 30, "M": 256, "C": 512},  # the paper: CLIP, 16x16 tokens, batch 8
             {"B": 32, "L": 30, "M": 256, "C": 512}],
    "gpu": [{"B": 8, "L": 30, "M": 256, "C": 512}, {"B": 64, "L": 30, "M": 256, "C": 512}],
    "bench": [{"B": 8, "L": 30, "M": 256, "C": 512}],
}


def shape_label(shape: dict) -> str:
    return f"B{shape['B']} L{shape['L']} M{shape['M']} C{shape['C']}"


def parse_shape(text: str) -> dict:
    match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)x(\d+)\s*", text)
    if not match:
        raise ValueError(f"relation shape {text!r}: write BxLxMxC")
    return dict(zip("BLMC", map(int, match.groups())))


def input_bytes(shape: dict, dtype: str) -> int:
    rows = shape["B"] * (shape["L"] + 2 * shape["M"])
    return rows * shape["C"] * harness.element_size(dtype)


def make_inputs(shape: dict, device: torch.device, dtype: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    b, l, m, c = shape["B"], shape["L"], shape["M"], shape["C"]
    storage = harness.torch_dtype(dtype)
    words = torch.randn(b, l, c, generator=generator).to(device=device, dtype=storage)
    visual = torch.randn(b, m, c, generator=generator).to(device=device, dtype=storage)
    codes = torch.randn(b, m, c, generator=generator).to(device=device, dtype=storage)
    mask = (torch.rand(b, l, generator=generator) > 0.25).to(device)
    return words, visual, codes, mask


def _targets(rows):
    by_case = {}
    for row in rows:
        by_case.setdefault((row.shape, row.dtype), {})[row.provider] = row
    targets = []
    for (shape, dtype), found in sorted(by_case.items()):
        native, loop = found.get("lgvq-native"), found.get("paper-loop")
        description = f"fused op vs the paper's per-word loop at {shape} ({dtype})"
        if not native or not loop or native.median_s is None or loop.median_s is None:
            continue
        ratio = loop.median_s / native.median_s
        targets.append(harness.Target(description, "MET" if ratio >= 1 else "NOT MET",
                                      f"{ratio:.1f}x ({native.median_s * 1e3:.2f} ms vs "
                                      f"{loop.median_s * 1e3:.2f} ms)"))
    return targets


FAMILY = harness.register(harness.OpFamily(
    name="relation", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_label=shape_label, parse_shape=parse_shape, baseline="lgvq-reference",
    targets=_targets))


def _lgvq_available(backend: str):
    def available(device: torch.device) -> tuple[bool, str]:
        import lgvq_kernels

        info = lgvq_kernels._backends.backend_info(backend, device, "relation_alignment_loss")
        if info.available and backend == "triton" and device.type != "cuda":
            return False, "the Triton CPU interpreter is for tests, far too slow to time"
        return info.available, info.reason

    return available


def _lgvq_factory(backend: str):
    def factory(shape: dict, device: torch.device, dtype: str):
        import lgvq_kernels

        words, visual, codes, mask = make_inputs(shape, device, dtype)
        codes.requires_grad_(True)

        def step():
            codes.grad = None
            result = lgvq_kernels.relation_alignment_loss(words, visual, codes, mask,
                                                          backend=backend)
            result.loss.backward()
            return result.loss

        return step

    return factory


for _backend in ("native", "triton", "reference"):
    FAMILY.provider(f"lgvq-{_backend}", f"lgvq {_backend}",
                    available=_lgvq_available(_backend))(_lgvq_factory(_backend))


def paper_loop_loss(words, visual, codes, mask):
    """The public code's structure, in float32 with autograd: a loop over images and words."""
    w_all = F.normalize(words.float(), dim=-1)
    v_all = F.normalize(visual.float(), dim=-1)
    batch, length, _ = words.shape
    total = codes.new_zeros((), dtype=torch.float32)
    for b in range(batch):
        similarity = w_all[b] @ v_all[b].t()
        rows = []
        for i in range(length):
            value, position = similarity[i].max(0)
            rows.append(F.normalize(value * codes[b, position].float(), dim=-1))
        code_side = torch.stack(rows) * mask[b, :, None]
        word_side = w_all[b] * mask[b, :, None]
        total = total + ((code_side @ code_side.t() - word_side @ word_side.t()) ** 2).sum()
    return total / (batch * length * length)


@FAMILY.provider("paper-loop", "paper's per-word loop")
def paper_loop(shape: dict, device: torch.device, dtype: str):
    words, visual, codes, mask = make_inputs(shape, device, dtype)
    codes.requires_grad_(True)

    def step():
        codes.grad = None
        loss = paper_loop_loss(words, visual, codes, mask)
        loss.backward()
        return loss

    return step

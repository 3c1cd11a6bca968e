"""Relation alignment loss (LG-VQ's Relationship Alignment Module): forward + backward of
lgvq_kernels.relation_alignment_loss against the reference composition of PyTorch ops and
against the paper code's per-word Python loop.

Shape dict: {"B": images, "L": words per caption, "M": visual positions, "C": text width}.
Inputs (seeded): words, visual tokens and projected codes ~ N(0, 1); 25 % of the word slots are
padding. The timed function computes the loss and its gradient w.r.t. the codes (the only input
with a gradient: the targets are under stop-gradient and the argmax is hard).

Providers:
  lgvq-native / lgvq-triton / lgvq-reference   relation_alignment_loss(..., backend=name)
  official-loop  the official code's structure: one Python iteration per word position, each
               batched over the images (argmax over the positions, gather, normalise); stack,
               Gram matrices and MSE, autograd backward. This is the loop the fused op replaces.
  paper-loop   a slower reading of the same loss: for each image, for each word (B x L
               iterations); the float64 oracle of the tests, timed for reference only
"""

from __future__ import annotations

import torch

from benchmarks import harness

SHAPE_SETS = {
    "quick": [{"B": 16, "L": 30, "M": 64, "C": 384}],
    "full": [{"B": 16, "L": 30, "M": 64, "C": 384},  # the shapes demo (MiniLM, 8x8 tokens)
             {"B": 8, "L": 30, "M": 256, "C": 512},  # the paper: CLIP, 16x16 tokens, batch 8
             {"B": 32, "L": 30, "M": 256, "C": 512}],
    "gpu": [{"B": 8, "L": 30, "M": 256, "C": 512}, {"B": 64, "L": 30, "M": 256, "C": 512}],
    "bench": [{"B": 8, "L": 30, "M": 256, "C": 512}],
}


SHAPE_FORMAT = harness.ShapeFormat("{B}x{L}x{M}x{C}", label="B{B} L{L} M{M} C{C}")


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
    return [harness.ratio_target(f"fused op faster than the official code's per-word loop at "
                                 f"{shape} ({dtype}): loop / native",
                                 found, "official-loop", "lgvq-native", at_least=1)
            for (shape, dtype), found in sorted(harness.rows_by_case(rows).items())
            if "official-loop" in found and "lgvq-native" in found]


FAMILY = harness.register(harness.OpFamily(
    name="relation", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT, baseline="lgvq-reference",
    targets=_targets))


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
                    available=harness.lgvq_backend_available(
                        _backend, "relation_alignment_loss"))(_lgvq_factory(_backend))


@FAMILY.provider("paper-loop", "paper's per-word loop")
def paper_loop(shape: dict, device: torch.device, dtype: str):
    from lgvq_kernels.reference import relation_alignment_loss_loop

    words, visual, codes, mask = make_inputs(shape, device, dtype)
    codes.requires_grad_(True)

    def step():
        codes.grad = None
        loss = relation_alignment_loss_loop(words, visual, codes, mask, torch.float32)
        loss.backward()
        return loss

    return step


@FAMILY.provider("official-loop", "official code's loop over word positions")
def official_loop(shape: dict, device: torch.device, dtype: str):
    words, visual, codes, mask = make_inputs(shape, device, dtype)
    codes.requires_grad_(True)
    w = torch.nn.functional.normalize(words.float(), dim=-1)
    v = torch.nn.functional.normalize(visual.float(), dim=-1)
    rows = torch.arange(words.shape[0], device=device)
    m = mask.float()[..., None]

    def step():
        codes.grad = None
        similarity = torch.bmm(w, v.transpose(1, 2))  # [B, L, M]
        picked = []
        for i in range(words.shape[1]):  # as the official code: a Python loop over words
            value, position = similarity[:, i].max(dim=1)
            picked.append(torch.nn.functional.normalize(
                value[:, None] * codes[rows, position].float(), dim=-1))
        code_side = torch.stack(picked, dim=1) * m
        word_side = w * m
        loss = ((code_side @ code_side.transpose(1, 2)
                 - word_side @ word_side.transpose(1, 2)) ** 2).mean()
        loss.backward()
        return loss

    return step

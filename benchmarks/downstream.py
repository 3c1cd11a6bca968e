"""The downstream code transformer (lgvq.downstream): sampling with and without the KV cache, and
one training step with codebook-initialised code embeddings against a plain embedding table.

Shape dict: {"B": sequences, "L": codes per sequence, "W": transformer width, "N": layers}
(heads = W / 32). The codebook is K = 256 codes of D = 32 (the shapes demo's tokenizer); the
model has one start token before the codes.

Family ``downstream_sampling`` (the timed call samples B whole sequences; codes/s = B * L /
median, printed by its target lines):
  cached     sample_autoregressive(use_cache=True): one position per step, keys/values reused
  uncached   the whole sequence again for every code (the reference the cache must equal)

Family ``downstream_step`` (forward + backward + AdamW step on B random sequences):
  codebook   code embeddings = Linear(D, W) of the frozen codebook + a learned offset (default)
  learned    a plain nn.Embedding(K, W)
"""

from __future__ import annotations

import json

import torch

from benchmarks import harness

CODEBOOK = (256, 32)  # K, D

SHAPE_SETS = {
    "quick": [{"B": 8, "L": 64, "W": 96, "N": 2}],  # the downstream demo's model
    "full": [{"B": 8, "L": 64, "W": 96, "N": 2}, {"B": 8, "L": 256, "W": 256, "N": 4}],
    "gpu": [{"B": 32, "L": 256, "W": 512, "N": 8}],
    "bench": [{"B": 8, "L": 64, "W": 96, "N": 2}],
}

SHAPE_FORMAT = harness.ShapeFormat("{B}x{L}x{W}x{N}", label="B{B} L{L} W{W} N{N}")


def input_bytes(shape: dict, dtype: str) -> int:
    return shape["B"] * shape["L"] * 8 + CODEBOOK[0] * CODEBOOK[1] * 4


def build(shape: dict, device: torch.device, embedding: str = "codebook"):
    from lgvq.downstream.transformer import CodeTransformer, TransformerShape

    torch.manual_seed(0)
    sizes = TransformerShape(codebook_size=CODEBOOK[0], length=shape["L"], prefix_length=1,
                             width=shape["W"], layers=shape["N"], heads=max(1, shape["W"] // 32))
    codebook = torch.randn(*CODEBOOK, generator=torch.Generator().manual_seed(0))
    return CodeTransformer(sizes, codebook, embedding=embedding).to(device)


def _codes_per_second(rows):
    lines = []
    for (shape, dtype), found in sorted(harness.rows_by_case(rows).items()):
        lines.append(harness.ratio_target(
            f"KV-cache sampling faster than uncached sampling ({shape}, {dtype}): "
            "uncached / cached", found, "uncached", "cached", at_least=1.5))
        rates = []
        for name, row in sorted(found.items()):
            if row.median_s:
                sizes = json.loads(row.shape_json)
                rates.append(f"{name} {sizes['B'] * sizes['L'] / row.median_s:,.0f} codes/s")
        lines.append(harness.Target(f"sampling throughput ({shape}, {dtype})", "INFO",
                                    ", ".join(rates) or "nothing measured"))
    return lines


SAMPLING = harness.register(harness.OpFamily(
    name="downstream_sampling", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT, baseline="uncached", targets=_codes_per_second))


def _sampler(use_cache: bool):
    def factory(shape: dict, device: torch.device, dtype: str):
        from lgvq.downstream.sampling import SamplingOptions, sample_autoregressive

        model = build(shape, device).eval()
        prefix = torch.zeros(shape["B"], 1, dtype=torch.long, device=device)
        options = SamplingOptions(temperature=1.0, top_k=64)

        def step():
            return sample_autoregressive(model, prefix, options=options, use_cache=use_cache,
                                         generator=torch.Generator().manual_seed(0))

        return step

    return factory


SAMPLING.provider("cached", "KV cache")(_sampler(True))
SAMPLING.provider("uncached", "no cache (whole sequence per code)")(_sampler(False))


def _step_targets(rows):
    return [harness.ratio_target(
        f"codebook-initialised embeddings cost <= 1.1x a plain embedding per step ({shape}): "
        "codebook / learned", found, "codebook", "learned", at_most=1.1)
        for (shape, _), found in sorted(harness.rows_by_case(rows).items())]


STEP = harness.register(harness.OpFamily(
    name="downstream_step", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT, baseline="learned", targets=_step_targets))


def _trainer(embedding: str):
    def factory(shape: dict, device: torch.device, dtype: str):
        import torch.nn.functional as F

        model = build(shape, device, embedding).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # as training
        generator = torch.Generator().manual_seed(1)
        codes = torch.randint(0, CODEBOOK[0], (shape["B"], shape["L"]),
                              generator=generator).to(device)
        prefix = torch.zeros(shape["B"], 1, dtype=torch.long, device=device)

        def step():
            logits = model(prefix, codes)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return step

    return factory


STEP.provider("codebook", "codebook -> Linear (+ offset)")(_trainer("codebook"))
STEP.provider("learned", "nn.Embedding")(_trainer("learned"))

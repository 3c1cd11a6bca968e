"""The code transformer and its samplers: KV cache equals no cache, seeded reproducibility,
filters, tiny-data convergence (autoregressive and MaskGIT)."""

import pytest
import torch

from lgvq.downstream.sampling import (
    SamplingOptions,
    filter_logits,
    sample_autoregressive,
    sample_maskgit,
)
from lgvq.downstream.transformer import CodeTransformer, TransformerShape


def _model(causal=True, context_width=0, embedding="codebook", seed=0, **sizes):
    torch.manual_seed(seed)
    shape = TransformerShape(codebook_size=12, length=10, prefix_length=2, condition_vocab=3,
                             width=32, layers=2, heads=4, causal=causal,
                             context_width=context_width, **sizes)
    return CodeTransformer(shape, torch.randn(12, 6), embedding=embedding)


@pytest.mark.parametrize("embedding", ["codebook", "learned"])
def test_kv_cache_sampling_equals_uncached_sampling(embedding):
    # float64: the cached and uncached logits then agree to ~1e-15, so no draw can fall
    # between them; the test asserts identical codes
    model = _model(context_width=5, embedding=embedding).double()
    prefix = torch.tensor([[0, 1], [2, 1], [1, 1]])
    given = torch.randint(0, 12, (3, 3), generator=torch.Generator().manual_seed(1))
    context = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    options = SamplingOptions(temperature=1.3, top_k=8, top_p=0.9)
    results = [sample_autoregressive(model, prefix, given, options=options, use_cache=cached,
                                     generator=torch.Generator().manual_seed(5),
                                     context=context, context_mask=mask)
               for cached in (True, False)]
    assert results[0].shape == (3, 10) and torch.equal(results[0][:, :3], given)
    assert torch.equal(results[0], results[1])


def test_cached_logits_match_the_full_forward():
    model = _model().eval()
    prefix, codes = torch.tensor([[0, 2]]), torch.randint(0, 12, (1, 10))
    full = model(prefix, codes)  # [1, 10, K]: logits of every code
    from lgvq.downstream.transformer import KVCache
    cache = KVCache()
    steps = [model.run(model.embed(prefix, codes[:, :4]), cache=cache)[:, -1]]
    for i in range(4, 9):
        steps.append(model.run(model.embed(None, codes[:, i:i + 1], start=cache.length),
                               cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = _model()
    prefix = torch.zeros(4, 2, dtype=torch.long)

    def run(seed):
        return sample_autoregressive(model, prefix, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    bidirectional = _model(causal=False)

    def masked(seed):
        return sample_maskgit(bidirectional, 4, steps=4, prefix=prefix,
                              generator=torch.Generator().manual_seed(seed))

    first = masked(3)
    assert torch.equal(first, masked(3)) and not torch.equal(first, masked(4))
    assert int(first.max()) < 12  # no [MASK] left


def test_filters_keep_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))  # 0.5 + 0.3 reach 0.8
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0).check()


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="embedding must be one of"):
        _model(embedding="onehot")
    model = _model()
    with pytest.raises(ValueError, match="prefix must have 2 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="causal model"):
        sample_autoregressive(_model(causal=False), torch.zeros(1, 2, dtype=torch.long))


def _memorise(model, prefix, targets, steps, loss_of):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, prefix, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_autoregressive_model_memorises_and_regenerates_tiny_data():
    model = _model()
    targets = torch.randint(0, 12, (3, 10), generator=torch.Generator().manual_seed(0))
    prefix = torch.tensor([[0, 0], [1, 0], [2, 0]])  # a class token per sequence

    def loss_of(m, p, t):
        return torch.nn.functional.cross_entropy(m(p, t).transpose(1, 2), t)

    losses = _memorise(model, prefix, targets, 150, loss_of)
    assert losses[-1] < 0.1 * losses[0]
    greedy = sample_autoregressive(model, prefix, options=SamplingOptions(temperature=0))
    assert torch.equal(greedy, targets)
    completed = sample_autoregressive(model, prefix, targets[:, :5],
                                      generator=torch.Generator().manual_seed(0),
                                      options=SamplingOptions(top_k=1))
    assert torch.equal(completed, targets)


def test_maskgit_model_memorises_text_conditioned_tiny_data():
    model = _model(causal=False, context_width=4)
    targets = torch.randint(0, 12, (3, 10), generator=torch.Generator().manual_seed(0))
    context = torch.eye(4)[:3, None, :].repeat(1, 2, 1)  # a distinct "caption" per target
    mask = torch.ones(3, 2, dtype=torch.bool)
    prefix = torch.zeros(3, 2, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)

    def loss_of(m, p, t):
        masked = torch.rand(t.shape, generator=generator) < 0.5
        masked[:, 0] |= ~masked.any(1)
        inputs = t.masked_fill(masked, m.mask_id)
        logits = m(p, inputs, context, mask)
        return torch.nn.functional.cross_entropy(logits[masked], t[masked])

    losses = _memorise(model, prefix, targets, 120, loss_of)
    assert losses[-1] < 0.1 * losses[0]
    sampled = sample_maskgit(model, 3, steps=4, prefix=prefix, context=context,
                             context_mask=mask, options=SamplingOptions(temperature=0),
                             guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, targets)

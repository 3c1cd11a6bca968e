"""ResidualVQ, ClusteredVectorQuantizer (CVQ) and the taming-transformers adapter: shapes,
losses, legacy weighting, decode round trips, quantize dropout, re-anchoring."""

import pytest
import torch
import torch.nn.functional as F

import lgvq

BACKENDS = ["reference", "auto"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# --------------------------------------------------------------------------------------------
# ResidualVQ
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_residual_vq_shapes_losses_and_round_trip(shared, backend):
    torch.manual_seed(0)
    rvq = lgvq.ResidualVQ(16, 3, 32, codebook_dim=8, shared_codebook=shared, backend=backend)
    x = torch.randn(2, 10, 16, requires_grad=True)
    quantized, indices, losses, parts = rvq(x, return_loss_breakdown=True)
    assert quantized.shape == x.shape and indices.shape == (2, 10, 3)
    assert losses.shape == (3,) and parts.commitment.shape == (3,)
    assert len(rvq.quantizers) == (1 if shared else 3)
    losses.sum().backward()
    assert x.grad is not None
    rvq.eval()
    quantized, indices, _ = rvq(x)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=0,
                               atol=1e-5)
    codes = rvq.get_codes_from_indices(indices)
    assert codes.shape == (3, 2, 10, 8)


def test_residual_vq_stages_reduce_the_error(backend):
    torch.manual_seed(0)
    rvq = lgvq.ResidualVQ(8, 4, 64, backend=backend, kmeans_init=True)
    x = torch.randn(1, 512, 8)
    rvq(x)  # k-means init of every stage on its residual
    rvq.eval()
    _, indices, _ = rvq(x)
    errors = [(rvq.get_output_from_indices(indices[..., :q]) - x).pow(2).mean().item()
              for q in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


def test_residual_vq_matches_a_chain_of_vector_quantizers(backend):
    torch.manual_seed(0)
    rvq = lgvq.ResidualVQ(8, 2, 16, backend=backend).eval()
    x = torch.randn(2, 7, 8)
    quantized, indices, losses = rvq(x)
    first, second = rvq.quantizers
    q1, i1, l1 = first(x)
    q2, i2, l2 = second(x - q1)
    assert torch.equal(indices, torch.stack([i1, i2], dim=-1))
    torch.testing.assert_close(quantized, q1 + q2)
    torch.testing.assert_close(losses, torch.stack([l1, l2]))


def test_quantize_dropout_drops_trailing_stages_of_the_batch(backend):
    # vector-quantize-pytorch's semantics: one number of stages per training step
    torch.manual_seed(0)
    rvq = lgvq.ResidualVQ(8, 4, 16, backend=backend, quantize_dropout=1.0,
                          quantize_dropout_cutoff_index=1)
    x = torch.randn(8, 3, 8)
    kept_counts = set()
    for _ in range(12):
        _, indices, losses = rvq(x)
        dropped = indices == -1
        assert not dropped[..., :2].any()  # stages 0..cutoff always run
        # a dropped stage stays dropped for the later ones, and for every row of the batch
        assert (dropped[..., 1:] >= dropped[..., :-1]).all()
        assert (dropped == dropped[:1, :1]).all()
        kept = 4 - int(dropped[0, 0].sum())
        assert bool((losses[kept:] == 0).all())
        kept_counts.add(kept)
    assert kept_counts <= {2, 3, 4} and len(kept_counts) > 1
    rvq.eval()
    assert not (rvq(x)[1] == -1).any()  # no dropout at inference


def test_quantize_dropout_output_uses_only_kept_stages(backend):
    torch.manual_seed(0)
    rvq = lgvq.ResidualVQ(8, 3, 16, backend=backend, quantize_dropout=True, ema_update=False)
    x = torch.randn(16, 5, 8)
    quantized, indices, _ = rvq(x)
    torch.testing.assert_close(quantized, rvq.get_output_from_indices(indices), rtol=0,
                               atol=1e-5)


def test_residual_vq_image_fmap_and_mask(backend):
    rvq = lgvq.ResidualVQ(6, 2, 8, backend=backend, accept_image_fmap=True)
    z = torch.randn(2, 6, 3, 4)
    quantized, indices, losses = rvq(z)
    assert quantized.shape == z.shape and indices.shape == (2, 3, 4, 2)
    rvq.eval()
    torch.testing.assert_close(rvq.get_output_from_indices(rvq(z)[1]), rvq(z)[0])
    mask_rvq = lgvq.ResidualVQ(6, 2, 8, backend=backend)
    x = torch.randn(2, 5, 6)
    mask = torch.rand(2, 5) > 0.5
    quantized, indices, _ = mask_rvq(x, mask=mask)
    assert torch.equal(quantized[~mask], x[~mask]) and (indices[~mask] == -1).all()


def test_residual_vq_validation():
    with pytest.raises(ValueError, match="num_quantizers"):
        lgvq.ResidualVQ(8, 0, 16)
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index"):
        lgvq.ResidualVQ(8, 2, 16, quantize_dropout=0.5, quantize_dropout_cutoff_index=2)
    with pytest.raises(ValueError, match="heads"):
        lgvq.ResidualVQ(8, 2, 16, heads=2)
    with pytest.raises(ValueError, match="x "):
        lgvq.ResidualVQ(8, 2, 16)(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------------------------
# CVQ: online clustered codebook
# --------------------------------------------------------------------------------------------


def test_cvq_shapes_losses_and_gradients(backend):
    torch.manual_seed(0)
    cvq = lgvq.ClusteredVectorQuantizer(8, 16, backend=backend, accept_image_fmap=True)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    quantized, indices, loss, parts, usage = cvq(z, return_loss_breakdown=True,
                                                 return_usage=True)
    assert quantized.shape == z.shape and indices.shape == (2, 4, 4)
    torch.testing.assert_close(loss, 0.25 * parts.commitment + parts.codebook)
    loss.backward()
    assert z.grad is not None and cvq.embedding.weight.grad is not None
    cvq.eval()
    quantized, indices, _ = cvq(z)
    torch.testing.assert_close(cvq.get_output_from_indices(indices), quantized)


def test_cvq_reanchors_unused_codes_onto_the_data(backend):
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(256, 8, generator=generator) * 3 + 5.0
    torch.manual_seed(0)
    cvq = lgvq.ClusteredVectorQuantizer(8, 32, backend=backend, metric="l2")
    cvq.embedding.weight.data.normal_(0.0, 0.01)  # far from every feature
    _, indices, _ = cvq(data[None])
    used = torch.zeros(32, dtype=torch.bool)
    used[indices.unique()] = True
    moved = cvq.codebook.detach()
    # unused codes jumped onto their closest batch feature (weight ~ exp(-1e-3))
    nearest = data[torch.cdist(moved, data).argmin(dim=1)]
    assert torch.cdist(moved[~used], data).min(dim=1).values.max() < 0.05
    torch.testing.assert_close(moved[~used], nearest[~used], rtol=0, atol=0.05)
    assert (cvq.embed_prob > 0).sum() == used.sum()


def test_cvq_used_codes_stay_and_backward_sees_the_codes_it_used(backend):
    torch.manual_seed(0)
    cvq = lgvq.ClusteredVectorQuantizer(4, 4, backend=backend, metric="l2")
    cvq.embed_prob.fill_(0.25)  # every code well used: anchor weight exp(-1000) = 0
    before = cvq.codebook.detach().clone()
    x = torch.randn(1, 64, 4, requires_grad=True)
    _, indices, loss = cvq(x)
    torch.testing.assert_close(cvq.codebook.detach(), before)
    loss.backward()
    chosen = before[indices[0]]
    expected = 2 * 0.25 * (x[0].detach() - chosen) / x[0].numel()
    torch.testing.assert_close(x.grad[0], expected)


def test_cvq_contrastive_term_and_masks(backend):
    torch.manual_seed(0)
    cvq = lgvq.ClusteredVectorQuantizer(8, 8, backend=backend, contrastive_weight=1.0,
                                        anchor="random")
    x = torch.randn(3, 12, 8)
    mask = torch.rand(3, 12) > 0.4
    quantized, indices, loss, parts = cvq(x, mask=mask, return_loss_breakdown=True)
    assert parts.contrastive > 0
    torch.testing.assert_close(loss, 0.25 * parts.commitment + parts.codebook
                               + parts.contrastive)
    assert torch.equal(quantized[~mask], x[~mask]) and (indices[~mask] == -1).all()
    loss.backward()
    assert torch.isfinite(cvq.embedding.weight.grad).all()
    assert torch.isfinite(cvq.codebook).all()


def test_cvq_validation():
    with pytest.raises(ValueError, match="anchor"):
        lgvq.ClusteredVectorQuantizer(8, 8, anchor="probrandom")
    with pytest.raises(ValueError, match="usage_decay"):
        lgvq.ClusteredVectorQuantizer(8, 8, usage_decay=1.0)
    with pytest.raises(ValueError, match="metric"):
        lgvq.ClusteredVectorQuantizer(8, 8, metric="dot")


# --------------------------------------------------------------------------------------------
# taming-transformers adapter
# --------------------------------------------------------------------------------------------


def taming_reference(z, weight, beta, legacy):
    """taming-transformers VectorQuantizer2.forward written out (without remap)."""
    z = z.permute(0, 2, 3, 1).contiguous()
    flat = z.view(-1, weight.shape[1])
    distance = (flat ** 2).sum(1, keepdim=True) + (weight ** 2).sum(1) - 2 * flat @ weight.t()
    indices = distance.argmin(1)
    z_q = weight[indices].view(z.shape)
    if legacy:
        loss = ((z_q.detach() - z) ** 2).mean() + beta * ((z_q - z.detach()) ** 2).mean()
    else:
        loss = beta * ((z_q.detach() - z) ** 2).mean() + ((z_q - z.detach()) ** 2).mean()
    z_q = z + (z_q - z).detach()
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices


@pytest.mark.parametrize("legacy", [True, False])
def test_taming_adapter_matches_vector_quantizer2(legacy, backend):
    torch.manual_seed(0)
    quantizer = lgvq.TamingVectorQuantizer(16, 4, beta=0.25, legacy=legacy, backend=backend)
    quantizer.embedding.weight.data.normal_()
    weight = quantizer.embedding.weight.detach().clone().requires_grad_()
    z = torch.randn(2, 4, 3, 5)
    z_ours, z_theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    z_q, loss, (perplexity, min_encodings, indices) = quantizer(z_ours)
    ref_q, ref_loss, ref_indices = taming_reference(z_theirs, weight, 0.25, legacy)
    assert torch.equal(indices, ref_indices) and indices.shape == (30,)
    assert min_encodings is None and perplexity.shape == ()
    torch.testing.assert_close(z_q, ref_q)
    torch.testing.assert_close(loss, ref_loss)
    assert z_q.is_contiguous()
    upstream = torch.randn_like(z_q)
    ((z_q * upstream).sum() + loss).backward()
    ((ref_q * upstream).sum() + ref_loss).backward()
    torch.testing.assert_close(z_ours.grad, z_theirs.grad)
    torch.testing.assert_close(quantizer.embedding.weight.grad, weight.grad)


def test_taming_adapter_options_and_decode(backend):
    quantizer = lgvq.TamingVectorQuantizer(8, 4, 0.25, sane_index_shape=True,
                                           return_min_encodings=True, backend=backend)
    z = torch.randn(2, 4, 3, 3)
    z_q, _, (perplexity, min_encodings, indices) = quantizer(z)
    assert indices.shape == (2, 3, 3)
    assert torch.equal(min_encodings, F.one_hot(indices.reshape(-1), 8).float())
    decoded = quantizer.get_codebook_entry(indices.reshape(-1), (2, 3, 3, 4))
    torch.testing.assert_close(decoded, z_q)
    expected = set(lgvq.TamingVectorQuantizer(8, 4, 0.25).state_dict())
    assert expected == {"embedding.weight"}  # loads taming checkpoints as is
    with pytest.raises(ValueError, match="remap"):
        lgvq.TamingVectorQuantizer(8, 4, 0.25, remap="used.npy")
    with pytest.raises(ValueError, match="temp"):
        quantizer(z, temp=0.5)
    with pytest.raises(ValueError, match="z "):
        quantizer(torch.randn(2, 5, 3, 3))

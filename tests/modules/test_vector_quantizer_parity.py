"""VectorQuantizer against vector-quantize-pytorch's VectorQuantize with matching settings and
the same initial codebook: same indices, same loss, same input (and codebook) gradients, and the
same EMA codebook after several training steps."""

import pytest
import torch

import lgvq

vector_quantize_pytorch = pytest.importorskip("vector_quantize_pytorch")

BACKENDS = ["reference", "auto"]
STEPS = 4
# float32 on both sides; the EMA differs only in lerp vs mul-add rounding
LOSS_RTOL, GRAD_ATOL, CODEBOOK_ATOL, OUTPUT_ATOL = 1e-5, 1e-6, 1e-5, 1e-5

SETTINGS = {
    "l2": dict(),
    "cosine": dict(use_cosine_sim=True),
    "mask": dict(use_mask=True),
    "separate_heads": dict(heads=4, codebook_dim=4, separate_codebook_per_head=True),
    "shared_heads": dict(heads=2, codebook_dim=8),
    "projections": dict(codebook_dim=6),
    "learnable": dict(learnable_codebook=True, ema_update=False, commitment_weight=0.5),
    "straight_through": dict(rotation_trick=False),
    "channel_first": dict(channel_last=False),
    "image_fmap": dict(accept_image_fmap=True),
    "commitment_weight": dict(commitment_weight=0.25, decay=0.9, eps=1e-3),
}


def make_pair(backend, dim=16, codebook_size=32, use_mask=False, **settings):
    torch.manual_seed(0)
    # their defaults, rotation_trick included (on for dim > 1), must be ours
    theirs = vector_quantize_pytorch.VectorQuantize(dim=dim, codebook_size=codebook_size,
                                                    **settings)
    ours_settings = dict(settings)
    if settings.get("learnable_codebook"):  # vector-quantize-pytorch trains the codebook with
        # the commitment term itself: the same gradients as codebook_weight = commitment_weight
        ours_settings["codebook_weight"] = settings.get("commitment_weight", 1.0)
    ours = lgvq.VectorQuantizer(dim, codebook_size, backend=backend, **ours_settings)
    with torch.no_grad():
        ours.codebooks.copy_(theirs._codebook.embed)
        if ours.ema_update:
            ours.embed_sum.copy_(theirs._codebook.embed_avg)
        if ours.has_projections:
            ours.project_in.load_state_dict(theirs.project_in.state_dict())
            ours.project_out.load_state_dict(theirs.project_out.state_dict())
    return theirs.train(), ours.train()


def make_batch(settings, generator, dim=16):
    if settings.get("accept_image_fmap"):
        x = torch.randn(2, dim, 4, 6, generator=generator)
    elif settings.get("channel_last") is False:
        x = torch.randn(3, dim, 20, generator=generator)
    else:
        x = torch.randn(3, 20, dim, generator=generator)
    mask = (torch.rand(3, 20, generator=generator) > 0.3) if settings.get("use_mask") else None
    return x, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_vector_quantize_pytorch(name, backend):
    settings = SETTINGS[name]
    theirs, ours = make_pair(backend, **settings)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, mask = make_batch(settings, generator)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, i_theirs, loss_theirs, parts_theirs = theirs(x_theirs, mask=mask,
                                                               return_loss_breakdown=True)
        q_ours, i_ours, loss_ours, parts_ours = ours(x_ours, mask=mask, return_loss_breakdown=True)

        if mask is not None:  # vector-quantize-pytorch outputs zeros for padding, we output x
            q_theirs = torch.where(mask[..., None], q_theirs, x_theirs)
        assert torch.equal(i_theirs, i_ours), f"{name}: indices differ at step {step}"
        assert q_ours.shape == x.shape and q_ours.dtype == x.dtype
        torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=OUTPUT_ATOL)
        torch.testing.assert_close(parts_ours.commitment, parts_theirs.commitment,
                                   rtol=LOSS_RTOL, atol=1e-7)
        if not ours.learnable_codebook:
            torch.testing.assert_close(loss_ours, loss_theirs, rtol=LOSS_RTOL, atol=1e-7)

        upstream = torch.randn(x.shape, generator=generator)
        ((q_theirs * upstream).sum() + loss_theirs).backward()
        ((q_ours * upstream).sum() + loss_ours).backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=GRAD_ATOL)
        if ours.learnable_codebook:
            torch.testing.assert_close(ours.codebooks.grad, theirs._codebook.embed.grad,
                                       rtol=1e-5, atol=GRAD_ATOL)
            with torch.no_grad():  # the same plain SGD step on both codebooks
                ours.codebooks -= 0.5 * ours.codebooks.grad
                theirs._codebook.embed -= 0.5 * theirs._codebook.embed.grad
            ours.codebooks.grad = theirs._codebook.embed.grad = None
        torch.testing.assert_close(ours.codebooks, theirs._codebook.embed, rtol=0,
                                   atol=CODEBOOK_ATOL)
    if ours.ema_update:
        torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.embed_sum, theirs._codebook.embed_avg, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_matches_and_output_from_indices(backend):
    theirs, ours = make_pair(backend, codebook_dim=6)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 9, 16)
    q_theirs, i_theirs, _ = theirs(x)
    q_ours, i_ours, _ = ours(x)
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=OUTPUT_ATOL)
    torch.testing.assert_close(ours.get_output_from_indices(i_ours),
                               theirs.get_output_from_indices(i_theirs), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.get_codes_from_indices(i_ours),
                               theirs.get_codes_from_indices(i_theirs), rtol=0, atol=0)

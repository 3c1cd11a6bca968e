"""PatchGAN, hinge losses, adaptive weight (hand-computed), delayed start, VQGANLoss."""

import pytest
import torch
from torch import nn

from lgvq.models import (
    PatchDiscriminator,
    VQGANLoss,
    adaptive_generator_weight,
    discriminator_factor,
    hinge_discriminator_loss,
    hinge_generator_loss,
)


@pytest.mark.parametrize("size, norm, grid", [(64, "batch", 6), (32, "group", 2), (72, "batch", 7)])
def test_patch_discriminator_shapes(size, norm, grid):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(3, base_channels=8, num_layers=3, norm=norm)
    logits = discriminator(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, grid, grid)


def test_patch_discriminator_layout_matches_pix2pix():
    discriminator = PatchDiscriminator()  # ndf 64, 3 layers, BatchNorm
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules()) == 3
    # convs without bias where a norm follows; BatchNorm scale + shift
    expected = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + (
        512 * 16 + 1) + 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in discriminator.parameters()) == expected == 2_765_633
    with pytest.raises(ValueError, match="norm must be"):
        PatchDiscriminator(norm="instance")
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, H, W\]"):
        discriminator(torch.zeros(1, 1, 64, 64))


def test_hinge_losses_by_hand():
    logits_real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2 -> mean 5/6
    logits_fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2 -> mean 1
    expected = 0.5 * (5.0 / 6.0 + 1.0)
    torch.testing.assert_close(hinge_discriminator_loss(logits_real, logits_fake),
                               torch.tensor(expected))
    torch.testing.assert_close(hinge_generator_loss(logits_fake), torch.tensor(1.0 / 3.0))
    # a confident, correct discriminator has zero loss
    assert hinge_discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) == 0


def test_adaptive_weight_by_hand():
    weight = torch.zeros(2, requires_grad=True)
    nll = (torch.tensor([3.0, 4.0]) * weight).sum()  # gradient (3, 4), norm 5
    gan = (torch.tensor([0.6, 0.8]) * weight).sum()  # gradient (0.6, 0.8), norm 1
    result = adaptive_generator_weight(nll, gan, weight)
    torch.testing.assert_close(result, torch.tensor(5.0 / (1.0 + 1e-4)))
    assert not result.requires_grad
    # graphs are kept for the later backward
    (nll + gan).backward()
    torch.testing.assert_close(weight.grad, torch.tensor([3.6, 4.8]))


def test_adaptive_weight_is_clamped():
    weight = torch.zeros(2, requires_grad=True)
    nll = (torch.tensor([3.0, 4.0]) * weight).sum()
    gan = (torch.tensor([0.0, 0.0]) * weight).sum()  # zero gradient: 5 / 1e-4 = 5e4 -> 1e4
    assert adaptive_generator_weight(nll, gan, weight) == 1e4
    assert adaptive_generator_weight(nll, gan, weight, max_weight=7.0) == 7.0


def test_discriminator_factor_delayed_start():
    assert discriminator_factor(0, 10_000) == 0.0
    assert discriminator_factor(9_999, 10_000) == 0.0
    assert discriminator_factor(10_000, 10_000) == 1.0
    assert discriminator_factor(10_001, 10_000, factor=0.5) == 0.5


class _TinyGenerator(nn.Module):
    """A one-conv 'decoder' so the last layer is known exactly."""

    def __init__(self):
        super().__init__()
        self.output_conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.output_conv(x)


def _loss_and_inputs(disc_start=10, norm="group", **kwargs):
    torch.manual_seed(0)
    generator = _TinyGenerator()
    criterion = VQGANLoss(PatchDiscriminator(3, 8, 2, norm=norm), None, disc_start=disc_start,
                          **kwargs)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstructions = generator(torch.rand(2, 3, 32, 32))
    vq_loss = reconstructions.mean().square()  # any scalar in the graph
    return generator, criterion, images, reconstructions, vq_loss


def test_generator_loss_before_start_is_l1_plus_vq():
    generator, criterion, images, reconstructions, vq_loss = _loss_and_inputs()
    loss, logs = criterion.generator_loss(images, reconstructions, vq_loss, 9,
                                          generator.output_conv.weight)
    torch.testing.assert_close(loss, (images - reconstructions).abs().mean() + vq_loss)
    assert logs["adaptive_weight"] == 0 and logs["discriminator_factor"] == 0
    assert logs["generator_loss"] == 0 and logs["perceptual_loss"] == 0
    assert not criterion.discriminator_active(9) and criterion.discriminator_active(10)
    d_loss, d_logs = criterion.discriminator_loss(images, reconstructions, 9)
    assert d_loss == 0 and not d_loss.requires_grad and set(d_logs) == {
        "discriminator_loss", "logits_real", "logits_fake"}


def test_generator_loss_after_start_matches_the_formula():
    generator, criterion, images, reconstructions, vq_loss = _loss_and_inputs(
        codebook_weight=0.5)
    last_layer = generator.output_conv.weight
    loss, logs = criterion.generator_loss(images, reconstructions, vq_loss, 10, last_layer)

    l1 = (images - reconstructions).abs().mean()
    gan = -criterion.discriminator(reconstructions).mean()
    nll_grad = torch.autograd.grad(l1, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    adaptive = 0.8 * (nll_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(logs["adaptive_weight"], adaptive)
    torch.testing.assert_close(loss, l1 + adaptive * gan + 0.5 * vq_loss)
    torch.testing.assert_close(logs["generator_loss"], gan.detach())
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())

    # the discriminator's parameters get no gradient from the generator side
    loss.backward()
    assert last_layer.grad is not None
    assert all(p.grad is None for p in criterion.discriminator.parameters())
    assert all(p.requires_grad for p in criterion.discriminator.parameters())


def test_discriminator_loss_detaches_reconstructions():
    generator, criterion, images, reconstructions, _ = _loss_and_inputs(disc_factor=0.5,
                                                                        norm="batch")
    loss, logs = criterion.discriminator_loss(images, reconstructions, 10)
    loss.backward()
    assert generator.output_conv.weight.grad is None
    assert all(p.grad is not None for p in criterion.discriminator.parameters())
    criterion.eval()  # BatchNorm in eval mode, so both passes are reproducible
    with torch.no_grad():
        real = criterion.discriminator(images)
        fake = criterion.discriminator(reconstructions)
        eval_loss, _ = criterion.discriminator_loss(images, reconstructions, 10)
    torch.testing.assert_close(eval_loss, 0.5 * hinge_discriminator_loss(real, fake))


def test_no_grad_evaluation_uses_zero_adaptive_weight():
    generator, criterion, images, reconstructions, vq_loss = _loss_and_inputs()
    with torch.no_grad():
        loss, logs = criterion.generator_loss(images, reconstructions.detach(), vq_loss, 10,
                                              generator.output_conv.weight)
    assert logs["adaptive_weight"] == 0
    torch.testing.assert_close(loss, (images - reconstructions).abs().mean() + vq_loss)


def test_plain_vqvae_loss_with_mse():
    criterion = VQGANLoss(None, None, pixel_loss="mse")
    images, reconstructions = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    loss, logs = criterion.generator_loss(images, reconstructions, torch.tensor([0.25]), 10**6)
    assert loss == 1.25 and logs["pixel_loss"] == 1.0 and logs["vq_loss"] == 0.25
    assert not criterion.discriminator_active(10**6)
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGANLoss(pixel_loss="l2")
    with pytest.raises(ValueError, match="same shape"):
        criterion.generator_loss(images, reconstructions[..., :2], torch.tensor(0.0), 0)

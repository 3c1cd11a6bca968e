"""PatchGAN discriminator and the VQGAN training loss (taming-transformers' recipe).

Generator side (what the encoder, decoder and codebook minimise):

    L_G = L_pixel + perceptual_weight * LPIPS + factor(step) * lambda * L_gan
          + codebook_weight * L_vq
    lambda = disc_weight * clamp(||grad_w L_nll|| / (||grad_w L_gan|| + 1e-4), 0, 1e4)

with ``L_nll = L_pixel + perceptual_weight * LPIPS``, ``w`` the decoder's last conv weight,
``L_gan = -mean(D(x_hat))`` and ``factor(step) = disc_factor`` once ``step >= disc_start``, else 0.

Discriminator side:

    L_D = factor(step) * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))

:class:`VQGANLoss` computes the two sides in two calls that share one encoder/decoder forward:

    reconstructions, vq_loss, info = model(images)
    loss, logs = criterion.generator_loss(images, reconstructions, vq_loss, step, model.last_layer)
    loss.backward(); model_optimizer.step()
    if criterion.discriminator_active(step):
        d_loss, d_logs = criterion.discriminator_loss(images, reconstructions, step)
        d_loss.backward(); discriminator_optimizer.step()

The discriminator's parameters are frozen while the generator side runs, so ``loss.backward()``
leaves no gradient on them. With ``discriminator=None`` and no perceptual module the same class
is the plain VQ-VAE loss (pixel L1/MSE + VQ).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lgvq.models.lpips import LPIPS

__all__ = [
    "PatchDiscriminator",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "adaptive_generator_weight",
    "discriminator_factor",
    "VQGANLoss",
]


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """pix2pix/taming PatchGAN: images ``[B, C, H, W]`` in [-1, 1] -> logits ``[B, 1, h, w]``.

    ``num_layers`` stride-2 4x4 convs (channels ``base_channels * min(2**n, 8)``), one stride-1
    4x4 conv, and a stride-1 4x4 conv to one logit per patch; LeakyReLU(0.2) after every conv
    but the last, normalisation after every conv but the first and last. For 256x256 input and
    3 layers the logit map is 30x30 (70x70 receptive field); for 64x64 it is 6x6.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv (ndf, 64 in taming).
        num_layers: number of stride-2 convs (3 in taming).
        norm: ``"batch"`` (taming) or ``"group"`` (batch-size independent).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_channels = in_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Taming's initialisation: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W]`` -> ``[B, 1, h, w]`` real/fake logits per patch."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape [B, {self.in_channels}, H, W], got {tuple(images.shape)}"
            )
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake)))``; scalar >= 0."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(logits_fake)``: the generator raises the discriminator's score of its output."""
    return -logits_fake.mean()


def adaptive_generator_weight(nll_loss: torch.Tensor, generator_loss: torch.Tensor,
                              last_layer: torch.Tensor, *, max_weight: float = 1e4,
                              eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance between reconstruction and adversarial gradients at the last layer.

    Returns the detached scalar ``clamp(||d nll/d w|| / (||d gan/d w|| + eps), 0, max_weight)``
    (not yet multiplied by the discriminator weight). Both losses must depend on
    ``last_layer``; their graphs are kept for the later backward.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def discriminator_factor(global_step: int, disc_start: int, factor: float = 1.0) -> float:
    """``factor`` from step ``disc_start`` on, 0 before (taming's ``adopt_weight``)."""
    return factor if global_step >= disc_start else 0.0


@contextlib.contextmanager
def _frozen(module: nn.Module):
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class VQGANLoss(nn.Module):
    """Generator- and discriminator-side VQGAN losses (see the module docstring for formulas).

    Args:
        discriminator: the PatchGAN (or any ``[B, C, H, W] -> logits`` module); ``None`` for a
            plain VQ-VAE loss.
        perceptual: an :class:`~lgvq.models.lpips.LPIPS` (disabled ones are skipped) or ``None``.
        pixel_loss: ``"l1"`` (VQGAN) or ``"mse"`` (classic VQ-VAE), mean over all elements.
        perceptual_weight: weight of the LPIPS term (1.0 in taming).
        codebook_weight: weight of the quantizer's loss (1.0 in taming).
        disc_start: first step at which the GAN terms are on (10,000 in LG-VQ's configs).
        disc_weight: multiplier of the adaptive weight (0.8 in LG-VQ's configs).
        disc_factor: GAN-term factor once started (1.0).
        adaptive_weight_max: clamp of the adaptive weight (1e4).
    """

    def __init__(self, discriminator: nn.Module | None = None, perceptual: LPIPS | None = None,
                 *, pixel_loss: str = "l1", perceptual_weight: float = 1.0,
                 codebook_weight: float = 1.0, disc_start: int = 10_000,
                 disc_weight: float = 0.8, disc_factor: float = 1.0,
                 adaptive_weight_max: float = 1e4) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "mse"):
            raise ValueError(f"pixel_loss must be 'l1' or 'mse', got {pixel_loss!r}")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.pixel_loss = pixel_loss
        self.perceptual_weight = float(perceptual_weight)
        self.codebook_weight = float(codebook_weight)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.adaptive_weight_max = float(adaptive_weight_max)

    @property
    def perceptual_enabled(self) -> bool:
        return (self.perceptual is not None and getattr(self.perceptual, "enabled", True)
                and self.perceptual_weight != 0.0)

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at this step (a discriminator exists, step >= start)."""
        return (self.discriminator is not None
                and discriminator_factor(global_step, self.disc_start, self.disc_factor) != 0.0)

    def generator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor,
                       vq_loss: torch.Tensor, global_step: int,
                       last_layer: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder/decoder/codebook objective.

        Args:
            images: float ``[B, C, H, W]`` targets in [-1, 1].
            reconstructions: float ``[B, C, H, W]`` decoder output (with its graph).
            vq_loss: scalar quantizer loss (codebook + commitment).
            global_step: training step, for the delayed discriminator start.
            last_layer: the decoder's last weight (``VQModel.last_layer``); needed for the
                adaptive weight once the discriminator is active. Without it, or without
                grad mode (evaluation), the adaptive weight is 0 as in taming.
        Returns:
            ``(loss, logs)``: the scalar to back-propagate, and detached scalars
            ``loss, pixel_loss, perceptual_loss, nll_loss, vq_loss, generator_loss,
            adaptive_weight, discriminator_factor``.
        """
        if images.shape != reconstructions.shape:
            raise ValueError(
                f"images and reconstructions must have the same shape, got "
                f"{tuple(images.shape)} and {tuple(reconstructions.shape)}"
            )
        zero = reconstructions.new_zeros(())
        if self.pixel_loss == "l1":
            pixel = (images - reconstructions).abs().mean()
        else:
            pixel = (images - reconstructions).square().mean()
        perceptual = (
            self.perceptual(reconstructions, images).mean() if self.perceptual_enabled else zero
        )
        nll = pixel + self.perceptual_weight * perceptual
        vq_loss = vq_loss.reshape(()) if vq_loss.numel() == 1 else vq_loss.mean()

        factor = discriminator_factor(global_step, self.disc_start, self.disc_factor)
        generator = zero
        adaptive = zero
        if self.discriminator is not None and factor != 0.0:
            with _frozen(self.discriminator):
                generator = hinge_generator_loss(self.discriminator(reconstructions))
            if (last_layer is not None and torch.is_grad_enabled()
                    and generator.requires_grad and nll.requires_grad):
                adaptive = self.disc_weight * adaptive_generator_weight(
                    nll, generator, last_layer, max_weight=self.adaptive_weight_max
                )
        loss = nll + adaptive * factor * generator + self.codebook_weight * vq_loss
        logs = {
            "loss": loss, "pixel_loss": pixel, "perceptual_loss": perceptual, "nll_loss": nll,
            "vq_loss": vq_loss, "generator_loss": generator, "adaptive_weight": adaptive,
            "discriminator_factor": reconstructions.new_tensor(factor),
        }
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's hinge objective on real ``images`` and detached ``reconstructions``.

        Args: as :meth:`generator_loss` (``reconstructions`` are detached here, so the same
            tensor from the one shared forward can be passed).
        Returns:
            ``(loss, logs)`` with logs ``discriminator_loss, logits_real, logits_fake``
            (batch means). Before ``disc_start`` (or without a discriminator) the loss is a
            constant 0 with no graph: check :meth:`discriminator_active` and skip the step.
        """
        factor = discriminator_factor(global_step, self.disc_start, self.disc_factor)
        if self.discriminator is None or factor == 0.0:
            zero = images.new_zeros(())
            return zero, {"discriminator_loss": zero, "logits_real": zero, "logits_fake": zero}
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = factor * hinge_discriminator_loss(logits_real, logits_fake)
        logs = {
            "discriminator_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs

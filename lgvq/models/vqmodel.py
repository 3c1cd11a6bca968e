"""The VQ image tokenizer LG-VQ wraps: encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder.

Shapes: B = batch, H x W = image size, f = downsampling factor, h x w = H/f x W/f token grid,
Z = encoder ``z_channels``, D = ``embed_dim`` (code width), K = codebook size.

The quantizer is any module with the lucidrains / ``lgvq.VectorQuantizer`` interface (by
default the one ``lgvq.quantizers.build_quantizer`` makes from ``VQModelConfig.quantizer_kwargs``):

    quantized, indices, loss = quantizer(x)          # x: [B, h*w, D] channel-last
    # quantized [B, h*w, D] straight-through (x + sg(e - x)), indices int [B, h*w], loss scalar
    codes = quantizer.get_output_from_indices(indices)   # [B, h*w] -> [B, h*w, D]

Extra return values (a 4th, 5th, ... item) are passed through in ``info["quantizer_extras"]``.
LG-VQ's language losses read the straight-through map ``zq_st`` ([B, D, h, w]), which
:meth:`VQModel.encode` returns and :meth:`VQModel.forward` puts in its ``info`` dict, so the
one forward serves the reconstruction, GAN and language losses alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from lgvq.models.backbones import BackboneConfig, Decoder, Encoder
from lgvq.models.discriminator import PatchDiscriminator, VQGANLoss
from lgvq.models.lpips import LPIPS
from lgvq.quantizers.build import TAMING_QUANTIZER_KWARGS, build_quantizer

__all__ = ["VQEncoding", "VQModel", "VQModelConfig", "BuiltVQModel", "build_vqvae",
           "build_vqgan"]


class VQEncoding(NamedTuple):
    """What :meth:`VQModel.encode` returns."""

    z_e: torch.Tensor  # float [B, D, h, w] pre-quantization features (after the 1x1 conv)
    zq_st: torch.Tensor  # float [B, D, h, w] straight-through quantized map z_e + sg(e - z_e)
    indices: torch.Tensor  # int64 [B, h, w] code indices in [0, K)
    vq_loss: torch.Tensor  # float scalar quantizer loss (codebook + commitment)
    info: dict[str, Any]  # "quantizer_extras": tuple of any further quantizer outputs


class VQModel(nn.Module):
    """Encoder + quantizer + decoder.

    Args:
        encoder: ``[B, C, H, W] -> [B, Z, h, w]`` with a ``z_channels`` attribute
            (e.g. :class:`~lgvq.models.backbones.Encoder`).
        decoder: ``[B, Z, h, w] -> [B, C, H, W]`` with ``z_channels`` and, for the VQGAN
            adaptive weight, ``last_layer`` (e.g. :class:`~lgvq.models.backbones.Decoder`).
        quantizer: see the module docstring.
        embed_dim: D, the code width; 1x1 convs map Z -> D before and D -> Z after quantizing.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: nn.Module,
                 embed_dim: int) -> None:
        super().__init__()
        z_channels = getattr(encoder, "z_channels", None)
        if z_channels is None or getattr(decoder, "z_channels", z_channels) != z_channels:
            raise ValueError(
                "encoder and decoder must expose the same z_channels attribute, got "
                f"{z_channels} and {getattr(decoder, 'z_channels', None)}"
            )
        if not hasattr(quantizer, "get_output_from_indices"):
            raise TypeError(
                f"quantizer ({type(quantizer).__name__}) must provide get_output_from_indices"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.embed_dim = int(embed_dim)
        self.z_channels = int(z_channels)
        self.pre_quantization_conv = nn.Conv2d(self.z_channels, self.embed_dim, 1)
        self.post_quantization_conv = nn.Conv2d(self.embed_dim, self.z_channels, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight, for :meth:`VQGANLoss.generator_loss`."""
        return self.decoder.last_layer

    @property
    def downsampling_factor(self) -> int:
        return int(getattr(self.encoder, "downsampling_factor", 1))

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   tuple]:
        """``z_e [B, D, h, w]`` -> ``(zq_st [B, D, h, w], indices [B, h, w], vq_loss, extras)``."""
        batch, channels, height, width = z_e.shape
        flat = z_e.flatten(2).transpose(1, 2)  # [B, h*w, D]
        outputs = self.quantizer(flat)
        if not isinstance(outputs, tuple) or len(outputs) < 3:
            raise TypeError(
                f"quantizer must return (quantized, indices, loss, ...), got "
                f"{type(outputs).__name__}"
                + (f" of length {len(outputs)}" if isinstance(outputs, tuple) else "")
            )
        quantized, indices, loss = outputs[:3]
        if quantized.shape != flat.shape:
            raise ValueError(
                f"quantizer returned quantized of shape {tuple(quantized.shape)}, expected "
                f"{tuple(flat.shape)} ([B, h*w, D] channel-last)"
            )
        if indices.shape[:2] != (batch, height * width):
            raise ValueError(
                f"quantizer returned indices of shape {tuple(indices.shape)}, expected "
                f"[{batch}, {height * width}]"
            )
        zq_st = quantized.transpose(1, 2).reshape(batch, channels, height, width)
        indices = indices.reshape(batch, height, width, *indices.shape[2:]).long()
        if loss is None:
            loss = z_e.new_zeros(())
        elif loss.dim():
            loss = loss.reshape(()) if loss.numel() == 1 else loss.mean()
        return zq_st, indices, loss, tuple(outputs[3:])

    def encode(self, images: torch.Tensor) -> VQEncoding:
        """Images float ``[B, C, H, W]`` in [-1, 1] -> :class:`VQEncoding`
        ``(z_e, zq_st, indices, vq_loss, info)``."""
        z_e = self.pre_quantization_conv(self.encoder(images))
        zq_st, indices, vq_loss, extras = self.quantize(z_e)
        return VQEncoding(z_e, zq_st, indices, vq_loss, {"quantizer_extras": extras})

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> int64 token grid ``[B, h, w]`` (no grad)."""
        return self.encode(images).indices

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized map float ``[B, D, h, w]`` -> images ``[B, C, h*f, w*f]`` (~[-1, 1])."""
        if zq.dim() != 4 or zq.shape[1] != self.embed_dim:
            raise ValueError(
                f"zq must have shape [B, {self.embed_dim}, h, w], got {tuple(zq.shape)}"
            )
        return self.decoder(self.post_quantization_conv(zq))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices int ``[B, h, w]`` in [0, K) -> images ``[B, C, h*f, w*f]``."""
        if indices.dim() != 3 or indices.is_floating_point():
            raise ValueError(
                f"indices must be an integer tensor of shape [B, h, w], got "
                f"{tuple(indices.shape)} {indices.dtype}"
            )
        batch, height, width = indices.shape
        codes = self.quantizer.get_output_from_indices(indices.reshape(batch, height * width))
        codes = codes.reshape(batch, height, width, self.embed_dim).permute(0, 3, 1, 2)
        return self.decode(codes.contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images ``[B, C, H, W]`` in [-1, 1] -> ``(reconstructions [B, C, H, W], vq_loss,
        info)`` with info keys ``z_e, zq_st, indices, quantizer_extras`` (see
        :class:`VQEncoding`)."""
        encoding = self.encode(images)
        reconstructions = self.decode(encoding.zq_st)
        info = {"z_e": encoding.z_e, "zq_st": encoding.zq_st, "indices": encoding.indices,
                **encoding.info}
        return reconstructions, encoding.vq_loss, info


@dataclass
class VQModelConfig:
    """Tokenizer + loss hyper-parameters (saved into checkpoints with :meth:`to_dict`)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig.tiny)  # encoder/decoder
    embed_dim: int = 64  # D, code width
    codebook_size: int = 1024  # K, number of codes
    # build_quantizer's keyword arguments (kind and loss weights); default: LG-VQ's VQGAN
    # quantizer, taming's learnable codebook with commitment 1.0 and codebook 0.25
    quantizer_kwargs: dict[str, Any] = field(
        default_factory=lambda: dict(TAMING_QUANTIZER_KWARGS))
    pixel_loss: str = "l1"  # "l1" (VQGAN) or "mse" (classic VQ-VAE)
    codebook_weight: float = 1.0  # weight of the quantizer's loss in the total
    perceptual_weight: float = 1.0  # LPIPS weight (VQGAN only; 0 when weights are missing)
    lpips_weights_path: str | None = None  # local LPIPS (+VGG16) weights; None disables LPIPS
    lpips_backbone_weights_path: str | None = None  # optional separate torchvision VGG16 file
    disc_start: int = 10_000  # first step with GAN terms (VQGAN only)
    disc_weight: float = 0.8  # multiplier of the adaptive GAN weight
    disc_factor: float = 1.0  # GAN factor once started
    disc_layers: int = 3  # PatchGAN stride-2 layers
    disc_channels: int = 64  # PatchGAN first-layer width (ndf)
    disc_norm: str = "batch"  # PatchGAN normalisation: "batch" or "group"

    def __post_init__(self) -> None:
        if isinstance(self.backbone, Mapping):
            self.backbone = BackboneConfig(**self.backbone)
        if self.embed_dim < 1 or self.codebook_size < 1:
            raise ValueError(
                f"embed_dim and codebook_size must be >= 1, got {self.embed_dim} and "
                f"{self.codebook_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VQModelConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VQModelConfig field(s): {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides) -> VQModelConfig:
        """64x64 images -> 16x16 tokens, K=1024, D=64 (CPU scale).

        The PatchGAN is shrunk to 2 layers of width 32 (14x14 logits at 64x64, 34-pixel
        receptive field): the paper's 3 x 64 costs 5.5 GFLOP per batch-16 pass at 64x64 (this
        one 1.3), more than the tiny encoder+decoder forward (4.8), and its 70-pixel field
        would cover the whole image.
        """
        return cls(**{"backbone": BackboneConfig.tiny(), "embed_dim": 64, "disc_layers": 2,
                      "disc_channels": 32, **overrides})

    @classmethod
    def paper(cls, **overrides) -> VQModelConfig:
        """LG-VQ's VQGAN: 256x256 -> 16x16 tokens, K=1024, D=256, taming's learnable codebook
        (commitment 1.0, codebook 0.25), PatchGAN 3 x 64 from step 10,000 with weight 0.8."""
        return cls(**{"backbone": BackboneConfig.paper(), "embed_dim": 256,
                      "codebook_size": 1024, **overrides})


class BuiltVQModel(NamedTuple):
    model: VQModel  # the tokenizer (what the generator optimiser trains)
    loss: VQGANLoss  # the criterion; holds the discriminator (its own optimiser) and LPIPS


def _as_config(config: VQModelConfig | Mapping[str, Any] | None) -> VQModelConfig:
    if config is None:
        return VQModelConfig.tiny()
    if isinstance(config, VQModelConfig):
        return config
    if isinstance(config, Mapping):
        return VQModelConfig.from_dict(config)
    raise TypeError(f"config must be a VQModelConfig or a mapping, got {type(config).__name__}")


def _build_model(config: VQModelConfig,
                 quantizer: nn.Module | Callable[[], nn.Module] | None) -> VQModel:
    """The quantizer (unless a module is given) is built after the encoder and decoder, so the
    random initialisations always come in that order: encoder, decoder, quantizer."""
    encoder, decoder = Encoder(config.backbone), Decoder(config.backbone)
    if quantizer is None:
        quantizer = build_quantizer(dim=config.embed_dim, codebook_size=config.codebook_size,
                                    **config.quantizer_kwargs)
    elif not isinstance(quantizer, nn.Module):
        quantizer = quantizer()
    return VQModel(encoder, decoder, quantizer, config.embed_dim)


def build_vqvae(config: VQModelConfig | Mapping[str, Any] | None = None, *,
                quantizer: nn.Module | Callable[[], nn.Module] | None = None) -> BuiltVQModel:
    """Plain VQ-VAE: the tokenizer and a loss of ``pixel (L1/MSE) + codebook_weight * VQ``.

    Args:
        config: a :class:`VQModelConfig`, a mapping of its fields, or ``None`` (tiny).
        quantizer: the quantizer module, or a factory of it (called after the encoder and
            decoder are built); default ``build_quantizer(**config.quantizer_kwargs)``.
    """
    config = _as_config(config)
    loss = VQGANLoss(None, None, pixel_loss=config.pixel_loss, perceptual_weight=0.0,
                     codebook_weight=config.codebook_weight)
    return BuiltVQModel(_build_model(config, quantizer), loss)


def build_vqgan(config: VQModelConfig | Mapping[str, Any] | None = None, *,
                quantizer: nn.Module | Callable[[], nn.Module] | None = None) -> BuiltVQModel:
    """VQGAN: the tokenizer and a loss of L1 + LPIPS + adaptive hinge PatchGAN + VQ.

    LPIPS is on only when ``config.lpips_weights_path`` names an existing local file (else it
    warns once and the loss is L1 + GAN + VQ).
    """
    config = _as_config(config)
    discriminator = PatchDiscriminator(config.backbone.out_channels, config.disc_channels,
                                       config.disc_layers, config.disc_norm)
    perceptual = LPIPS(config.lpips_weights_path, config.lpips_backbone_weights_path)
    loss = VQGANLoss(discriminator, perceptual, pixel_loss=config.pixel_loss,
                     perceptual_weight=config.perceptual_weight,
                     codebook_weight=config.codebook_weight, disc_start=config.disc_start,
                     disc_weight=config.disc_weight, disc_factor=config.disc_factor)
    return BuiltVQModel(_build_model(config, quantizer), loss)

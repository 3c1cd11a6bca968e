"""VQGAN-style convolutional encoder and decoder (the image tokenizer's backbone).

The design follows taming-transformers' VQGAN: a 3x3 input convolution, per resolution level a
stack of residual blocks (GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip), optional
self-attention blocks at chosen resolutions, a downsampling step between levels, a middle block
(residual, attention, residual) and GroupNorm -> SiLU -> 3x3 conv to ``z_channels``. The decoder
mirrors it with nearest-neighbour upsampling followed by a 3x3 convolution.

Shapes: B = batch, C = ``in_channels`` (3 for RGB), H x W = image size, f = downsampling factor
``2 ** (len(channel_multipliers) - 1)``, h x w = H/f x W/f token grid, Z = ``z_channels``.
Images are float tensors in [-1, 1]; the decoder output is unbounded (not squashed by tanh), as
in taming, and is meant to be compared with [-1, 1] targets.

Two presets: :meth:`BackboneConfig.tiny` (64x64 -> 16x16 tokens, for the built-in shapes data on
CPU) and :meth:`BackboneConfig.paper` (256x256 -> 16x16 tokens, the LG-VQ/VQGAN configuration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BackboneConfig",
    "ResidualBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "Encoder",
    "Decoder",
]


@dataclass
class BackboneConfig:
    """Encoder/decoder hyper-parameters; the decoder mirrors the encoder."""

    image_size: int = 64  # nominal training resolution; decides which levels get attention
    in_channels: int = 3  # channels of the input images (3 = RGB)
    out_channels: int = 3  # channels of the decoded images
    base_channels: int = 32  # width of the first level; level i has base * multipliers[i]
    channel_multipliers: tuple[int, ...] = (1, 2, 2)  # one per level; f = 2 ** (len - 1)
    num_res_blocks: int = 1  # residual blocks per encoder level (the decoder uses one more)
    attention_resolutions: tuple[int, ...] = ()  # feature-map sides that get self-attention
    z_channels: int = 64  # channels of the encoder output / decoder input
    dropout: float = 0.0  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups (capped at the channel count of each layer)
    downsample_with_conv: bool = True  # strided 3x3 conv (taming) or 2x2 average pooling
    middle_attention: bool = True  # self-attention in the middle block (at the token grid)

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if len(self.channel_multipliers) < 1:
            raise ValueError("channel_multipliers must name at least one level, got ()")
        for name in ("image_size", "in_channels", "out_channels", "base_channels",
                     "z_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if any(m < 1 for m in self.channel_multipliers):
            raise ValueError(
                f"channel_multipliers must be positive, got {self.channel_multipliers}"
            )
        if self.image_size % self.downsampling_factor:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by the downsampling factor "
                f"2 ** (len(channel_multipliers) - 1) = {self.downsampling_factor}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling_factor(self) -> int:
        """f: the image side divided by the token-grid side."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def token_grid_size(self) -> int:
        """Side of the token grid at ``image_size`` (image_size / f)."""
        return self.image_size // self.downsampling_factor

    def replace(self, **changes) -> BackboneConfig:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> BackboneConfig:
        """64x64 -> 16x16 tokens (f=4), small enough to train on two CPU cores.

        Widths 16/16/32, one residual block per level, attention only in the middle block
        (at 16x16), z 64; 0.22 M parameters (encoder + decoder). Forward+backward of encoder +
        decoder at batch 16, 64x64: 14.4 GFLOP, ~0.5 s of single-thread CPU time on an AMD EPYC
        (AVX2) core. ``channel_multipliers=(1, 2, 2)`` is the wider variant (21.9 GFLOP,
        ~1.4x the time); ``(1, 1, 2, 2)`` gives 8x8 tokens (f=8, 12.1 GFLOP).
        """
        defaults = dict(
            image_size=64, base_channels=16, channel_multipliers=(1, 1, 2), num_res_blocks=1,
            attention_resolutions=(), z_channels=64, norm_groups=8,
        )
        defaults.update(overrides)
        return cls(**defaults)

    @classmethod
    def paper(cls, **overrides) -> BackboneConfig:
        """The VQGAN configuration LG-VQ uses: 256x256 -> 16x16 tokens (f=16).

        ch 128, multipliers (1, 1, 2, 2, 4), 2 residual blocks, attention at 16x16, z 256.
        """
        defaults = dict(
            image_size=256, base_channels=128, channel_multipliers=(1, 1, 2, 2, 4),
            num_res_blocks=2, attention_resolutions=(16,), z_channels=256, norm_groups=32,
        )
        defaults.update(overrides)
        return cls(**defaults)


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels``."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    """``x + conv(SiLU(norm(conv(SiLU(norm(x))))))``, with a 1x1 skip projection when the
    channel count changes. ``[B, in_channels, H, W] -> [B, out_channels, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity() if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.
    ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, *, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.output_projection = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W, C]
        q, k, v = (
            projection(h).reshape(batch, 1, channels, height * width).transpose(-1, -2)
            for projection in (self.query, self.key, self.value)
        )
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.output_projection(attended)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv after right/bottom zero padding (taming), or 2x2
    average pooling. ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int, *, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 conv.
    ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Residual blocks (each optionally followed by attention) and an optional resampler."""

    def __init__(self, blocks: Sequence[nn.Module], attentions: Sequence[nn.Module],
                 resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)  # empty, or one per block
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attentions):
                x = self.attentions[index](x)
        return self.resample(x)


class _MiddleBlock(nn.Module):
    """Residual -> (attention) -> residual at the lowest resolution."""

    def __init__(self, channels: int, config: BackboneConfig) -> None:
        super().__init__()
        self.block1 = ResidualBlock(channels, channels, dropout=config.dropout,
                                    norm_groups=config.norm_groups)
        self.attention = (
            AttentionBlock(channels, norm_groups=config.norm_groups)
            if config.middle_attention else nn.Identity()
        )
        self.block2 = ResidualBlock(channels, channels, dropout=config.dropout,
                                    norm_groups=config.norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attention(self.block1(x)))


def _check_images(images: torch.Tensor, channels: int, factor: int, argument: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(
            f"{argument} must have shape [B, {channels}, H, W], got {tuple(images.shape)}"
        )
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(
            f"{argument} height and width must be divisible by the downsampling factor "
            f"{factor}, got {tuple(images.shape[2:])}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{argument} must be a floating-point tensor, got {images.dtype}")


class Encoder(nn.Module):
    """Images ``[B, in_channels, H, W]`` in [-1, 1] -> features ``[B, z_channels, H/f, W/f]``.

    Any H, W divisible by f work; attention is placed by ``config.image_size``.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.z_channels = config.z_channels
        self.downsampling_factor = config.downsampling_factor
        widths = [config.base_channels * m for m in config.channel_multipliers]

        self.input_conv = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        levels = []
        resolution = config.image_size
        channels = widths[0]
        for level, width in enumerate(widths):
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(channels, width, dropout=config.dropout,
                                            norm_groups=config.norm_groups))
                channels = width
                if resolution in config.attention_resolutions:
                    attentions.append(AttentionBlock(channels, norm_groups=config.norm_groups))
            is_last = level == len(widths) - 1
            resample = (
                None if is_last
                else Downsample(channels, with_conv=config.downsample_with_conv)
            )
            levels.append(_Level(blocks, attentions, resample))
            if not is_last:
                resolution //= 2
        self.levels = nn.ModuleList(levels)
        self.middle = _MiddleBlock(channels, config)
        self.output_norm = group_norm(channels, config.norm_groups)
        self.output_conv = nn.Conv2d(channels, config.z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W]`` -> ``[B, z_channels, H/f, W/f]``."""
        _check_images(images, self.config.in_channels, self.downsampling_factor, "images")
        h = self.input_conv(images)
        for level in self.levels:
            h = level(h)
        h = self.middle(h)
        return self.output_conv(F.silu(self.output_norm(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]`` (~[-1, 1]).

    Mirrors :class:`Encoder`: input conv, middle block, then levels from the coarsest up, each
    with ``num_res_blocks + 1`` residual blocks and nearest upsampling + conv between levels.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.z_channels = config.z_channels
        self.upsampling_factor = config.downsampling_factor
        widths = [config.base_channels * m for m in config.channel_multipliers]

        channels = widths[-1]
        resolution = config.token_grid_size
        self.input_conv = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.middle = _MiddleBlock(channels, config)
        levels = []  # built coarsest first, applied in that order
        for level in reversed(range(len(widths))):
            width = widths[level]
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(channels, width, dropout=config.dropout,
                                            norm_groups=config.norm_groups))
                channels = width
                if resolution in config.attention_resolutions:
                    attentions.append(AttentionBlock(channels, norm_groups=config.norm_groups))
            resample = Upsample(channels) if level != 0 else None
            levels.append(_Level(blocks, attentions, resample))
            if level != 0:
                resolution *= 2
        self.levels = nn.ModuleList(levels)
        self.output_norm = group_norm(channels, config.norm_groups)
        self.output_conv = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: the layer VQGAN's adaptive GAN weight differentiates."""
        return self.output_conv.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, z_channels, h, w]`` -> ``[B, out_channels, h*f, w*f]``."""
        _check_images(latents, self.config.z_channels, 1, "latents")
        h = self.middle(self.input_conv(latents))
        for level in self.levels:
            h = level(h)
        return self.output_conv(F.silu(self.output_norm(h)))

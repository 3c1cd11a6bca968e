"""Input layouts of the quantizers: validation, and conversion to and from rows ``[M, dim]``.

Three layouts, chosen by two flags (the vector-quantize-pytorch ones):
  accept_image_fmap=True   x ``[B, dim, H, W]``            rows in (b, h, w) order
  channel_last=True        x ``[B, N, dim]`` or ``[B, dim]``  rows in (b, n) order
  channel_last=False       x ``[B, dim, N]``                rows in (b, n) order
The "lead shape" is x's shape without the feature axis (``(B, H, W)``, ``(B, N)`` or ``(B,)``);
masks and indices have that shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_in_range(name: str, value, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


class TokenLayout:
    """Where the feature axis of a quantizer's input lies, and how rows ``[M, dim]`` map to it."""

    def __init__(self, dim: int, *, accept_image_fmap: bool = False, channel_last: bool = True,
                 input_name: str = "x"):
        self.dim = dim
        self.input_name = input_name  # what error messages call the input
        self.accept_image_fmap = bool(accept_image_fmap)
        self.channel_last = bool(channel_last) and not self.accept_image_fmap

    @property
    def expected(self) -> str:
        if self.accept_image_fmap:
            return f"[B, {self.dim}, H, W] (accept_image_fmap=True)"
        if self.channel_last:
            return f"[B, N, {self.dim}] or [B, {self.dim}] (channel_last=True)"
        return f"[B, {self.dim}, N] (channel_last=False)"

    def check(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.input_name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.input_name} must be float32/float16/bfloat16/float64, "
                            f"got {x.dtype}")
        if self.accept_image_fmap:
            good = x.dim() == 4 and x.shape[1] == self.dim
        elif self.channel_last:
            good = x.dim() in (2, 3) and x.shape[-1] == self.dim
        else:
            good = x.dim() == 3 and x.shape[1] == self.dim
        if not good:
            raise ValueError(f"{self.input_name} must have shape {self.expected}, got shape "
                             f"{tuple(x.shape)}")

    def to_rows(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """x in this layout -> (rows ``[M, dim]``, lead shape). Validates x."""
        self.check(x)
        channels_last = x if self.channel_last else x.movedim(1, -1)
        return channels_last.reshape(-1, self.dim), tuple(channels_last.shape[:-1])

    def from_rows(self, rows: Tensor, lead_shape: tuple[int, ...]) -> Tensor:
        """rows ``[M, C]`` -> this layout with C channels (a view where possible)."""
        channels_last = rows.reshape(*lead_shape, rows.shape[-1])
        return channels_last if self.channel_last else channels_last.movedim(-1, 1)

    def mask_rows(self, mask, lead_shape: tuple[int, ...], device: torch.device) -> Tensor | None:
        """mask bool of the lead shape (True = quantize this vector) -> ``[M]`` or None."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(lead_shape):
            raise ValueError(f"mask must have shape {tuple(lead_shape)} ({self.input_name}'s shape "
                             f"without its feature axis), got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but {self.input_name} is on {device}")
        return mask.reshape(-1)

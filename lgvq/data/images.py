"""Image arrays to the tensors every lgvq data set yields."""

from __future__ import annotations

import numpy as np
import torch


def image_array_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] (0..255) -> contiguous float32 [3, H, W] in [-1, 1]."""
    # In numpy: one fused pass, ~3x faster than the same steps as torch ops at 64x64.
    channels_first = image.transpose(2, 0, 1).astype(np.float32, order="C")
    return torch.from_numpy(channels_first * np.float32(1 / 127.5) - np.float32(1))

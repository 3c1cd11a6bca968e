"""Argument checks shared by the evaluation measures: a wrong Python type or tensor dtype raises
TypeError, a wrong shape ValueError."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(name: str, value, dims: int | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    return value


def check_bool_mask(name: str, value, shape: torch.Size) -> Tensor:
    check_tensor(name, value)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value

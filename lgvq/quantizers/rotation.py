"""The rotation trick (Fifty et al., 2024, "Restructuring vector quantization with the rotation
trick", arXiv 2410.06424): an alternative to the straight-through estimator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_onto_codes(x: Tensor, codes: Tensor) -> Tensor:
    """Output with the value of ``codes`` whose gradient reaches ``x`` through a rotation.

    x ``[N, D]`` (differentiable), codes ``[N, D]`` (treated as constants), same dtype.
    With u = x/|x| and q = e/|e|, R is the rotation in the plane of u and q that maps u onto q,
    applied as R v = v - 2 (v.w) w + 2 (v.u) q with w = (u + q)/|u + q|; the output is
    (|e|/|x|) R x, whose value is e and whose Jacobian with respect to x is the constant
    (|e|/|x|) R (R and the scale are detached). Rows with x = 0 fall back to straight-through.
    Returns ``[N, D]`` with exactly the values of ``codes``.
    """
    codes = codes.detach()
    x_norm = x.detach().norm(dim=-1, keepdim=True)
    code_norm = codes.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    u = x.detach() / x_norm.clamp_min(tiny)
    q = codes / code_norm.clamp_min(tiny)
    w = F.normalize(u + q, dim=-1)  # u = -q gives w = 0: R = I - 2 u u^T, still maps u onto q
    rotated = x - 2.0 * (x * w).sum(-1, keepdim=True) * w + 2.0 * (x * u).sum(-1, keepdim=True) * q
    scaled = rotated * (code_norm / x_norm.clamp_min(tiny))
    through = torch.where(x_norm > 0, scaled, x)
    return codes + (through - through.detach())

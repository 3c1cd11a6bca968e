"""TamingVectorQuantizer: taming-transformers ``VectorQuantizer2`` (VQGAN, LG-VQ) on lgvq's ops.

Same constructor, same attribute names (``embedding``, ``n_e``, ``e_dim``, ``beta``, ``legacy``),
same return tuple, same state-dict keys, so VQGAN-style code can swap it in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lgvq.quantizers.layout import TokenLayout, check_in_range, check_positive_int
from lgvq.quantizers.types import code_counts, codebook_usage_from_counts
from lgvq.quantizers.peers import check_backend
from lgvq_kernels.functional import check_all_finite, nearest_code, quantize_straight_through


class TamingVectorQuantizer(nn.Module):
    """Learnable-codebook VQ with taming-transformers' interface.

    Args:
      n_e: number of codes K.
      e_dim: code size (the channel count of the input feature maps).
      beta: weight of one of the two loss terms, chosen by ``legacy``.
      remap, unknown_index: taming's index remapping; not supported (``remap`` must be None).
      sane_index_shape: return indices as ``[B, H, W]`` instead of flat ``[B*H*W]``.
      legacy: taming's historical weighting (default True):
        legacy=True:  loss = |x - sg(e)|^2 + beta * |sg(x) - e|^2  (commitment 1, codebook beta)
        legacy=False: loss = beta * |x - sg(e)|^2 + |sg(x) - e|^2  (the VQ-VAE paper's)
      return_min_encodings: also return the ``[B*H*W, n_e]`` one-hot matrix taming's first
        VectorQuantizer returned. Off by default: it is N x K memory, and VectorQuantizer2
        returns None there too.
      check_finite: raise ValueError when z holds NaN/Inf. Off by default: the check is
        one host sync per forward (vector-quantize-pytorch does not check either).
      backend: kernel backend: "auto", "reference", "native" or "triton".

    The codebook is ``embedding.weight`` (``nn.Embedding(n_e, e_dim)``, uniform in
    [-1/n_e, 1/n_e] as in taming).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, remap=None, unknown_index="random",
                 sane_index_shape: bool = False, legacy: bool = True, *,
                 return_min_encodings: bool = False, check_finite: bool = False,
                 backend: str = "auto"):
        super().__init__()
        check_positive_int("n_e", n_e)
        check_positive_int("e_dim", e_dim)
        check_in_range("beta", beta, 0.0)
        if remap is not None:
            raise ValueError("remap is not supported by TamingVectorQuantizer (pass remap=None)")
        check_backend(backend)
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = float(beta)
        self.legacy = bool(legacy)
        self.remap = None
        self.unknown_index = unknown_index
        self.re_embed = n_e
        self.sane_index_shape = bool(sane_index_shape)
        self.return_min_encodings = bool(return_min_encodings)
        self.check_finite = bool(check_finite)
        self.backend = backend
        self.layout = TokenLayout(e_dim, accept_image_fmap=True, input_name="z")
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False,
                return_logits: bool = False):
        """z ``[B, e_dim, H, W]`` floating -> ``(z_q, loss, (perplexity, min_encodings, indices))``.

        z_q: z's shape and dtype, contiguous; the codes, straight-through gradient to z.
        loss: float32 0-d, weighted as ``legacy`` says.
        perplexity: float32 0-d, exp(entropy) of this batch's code histogram (taming's
          VectorQuantizer2 returns None here).
        min_encodings: None, or the one-hot ``[B*H*W, n_e]`` with ``return_min_encodings``.
        indices: int64 ``[B*H*W]``, or ``[B, H, W]`` with ``sane_index_shape``.
        temp/rescale_logits/return_logits exist for interface compatibility with taming's
        GumbelQuantize and must keep their defaults.
        """
        if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits exist only for interface "
                             "compatibility with GumbelQuantize; keep their defaults")
        rows, lead_shape = self.layout.to_rows(z)
        if self.check_finite:
            check_all_finite("z", z)
        codebook = self.embedding.weight
        indices = nearest_code(rows.detach(), codebook.detach(), backend=self.backend).indices
        quantized, commitment, codebook_loss = quantize_straight_through(
            rows, codebook, indices, backend=self.backend)
        if self.legacy:
            loss = commitment + self.beta * codebook_loss
        else:
            loss = self.beta * commitment + codebook_loss
        z_q = self.layout.from_rows(quantized.to(z.dtype), lead_shape).contiguous()

        perplexity = codebook_usage_from_counts(code_counts(indices[None], self.n_e)).perplexity
        min_encodings = (F.one_hot(indices, self.n_e).to(z.dtype)
                         if self.return_min_encodings else None)
        if self.sane_index_shape:
            indices = indices.reshape(lead_shape)
        return z_q, loss, (perplexity, min_encodings, indices)

    def get_codebook_entry(self, indices: Tensor, shape) -> Tensor:
        """indices int64 (any shape, flattened) -> codes ``[N, e_dim]``, or ``[B, e_dim, H, W]``
        when ``shape`` = (B, H, W, e_dim) is given."""
        codes = self.embedding(indices.reshape(-1))
        if shape is not None:
            codes = codes.view(shape).permute(0, 3, 1, 2).contiguous()
        return codes

    def extra_repr(self) -> str:
        return (f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, legacy={self.legacy}, "
                f"backend={self.backend!r}")

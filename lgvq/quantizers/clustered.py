"""ClusteredVectorQuantizer: CVQ-VAE's online clustered codebook (Zheng and Vedaldi, ICCV 2023,
"Online Clustered Codebook"), the "CVQ" variant of LG-VQ.

A learnable codebook trained by the VQ-VAE loss. In training, an EMA (decay 0.99) tracks each
code's share of the batch; every step each code k moves toward an anchor feature of the batch,
  e_k <- (1 - a_k) e_k + a_k anchor_k,   a_k = exp(-usage_k * K * 10 / (1 - decay) - 1e-3),
so codes that are used keep their place (a_k ~ 0) and unused ones jump onto the data (a_k ~ 1).
The anchor of code k is the batch feature nearest to it (``nearest_code`` of the codes against
the batch features, no N x K matrix) or a random batch feature. An optional contrastive term
pulls each code toward its nearest features and away from the farthest half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq.quantizers import distributed
from lgvq.quantizers.kmeans import sample_rows
from lgvq.quantizers.layout import TokenLayout, check_in_range, check_positive_int
from lgvq.quantizers.types import LossBreakdown, code_counts, codebook_usage_from_counts
from lgvq.quantizers.peers import check_backend
from lgvq_kernels.functional import check_all_finite, nearest_code, quantize_straight_through

ANCHORS = ("closest", "random")


class ClusteredVectorQuantizer(nn.Module):
    """Online clustered VQ (CVQ-VAE), with VectorQuantizer's call convention.

    Args:
      dim: code size = feature size of the input.
      codebook_size: number of codes K.
      commitment_weight: beta of |x - sg(e)|^2 (CVQ-VAE / LG-VQ: 0.25).
      codebook_weight: weight of |sg(x) - e|^2 (1.0).
      metric: "cosine" (CVQ-VAE's default) or "l2" for choosing codes and anchors. The output is
        the raw code either way (codes are not normalised), as in CVQ-VAE.
      usage_decay: EMA decay of the code usage, in [0, 1) (0.99).
      anchor: "closest" (the batch feature nearest to each code) or "random" (a batch feature
        drawn uniformly). CVQ-VAE's "probrandom" (sampling from an N x K softmax) is not offered.
      contrastive_weight: weight of CVQ-VAE's contrastive term (0 disables; CVQ-VAE uses 1).
        It needs each code's rank of every batch feature, so it forms an ``[N, K]`` similarity
        matrix (the only N x K tensor in lgvq's quantizers).
      contrastive_temperature: temperature of that term (0.07).
      sync_codebook: under torch.distributed, all-reduce the usage counts and broadcast the
        anchors from rank 0 so every rank moves its codes identically (None: when a process
        group with more than one rank is initialised).
      accept_image_fmap, channel_last, check_finite, backend: as for VectorQuantizer.

    State (CVQ-VAE's names, so its checkpoints load): ``embedding.weight`` ``[K, dim]``
    (uniform in [-1/K, 1/K]) and ``embed_prob`` ``[K]`` float32, the usage EMA.
    """

    def __init__(self, dim: int, codebook_size: int, *, commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, metric: str = "cosine", usage_decay: float = 0.99,
                 anchor: str = "closest", contrastive_weight: float = 0.0,
                 contrastive_temperature: float = 0.07, sync_codebook: bool | None = None,
                 accept_image_fmap: bool = False, channel_last: bool = True,
                 check_finite: bool = False, backend: str = "auto"):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        check_in_range("commitment_weight", commitment_weight, 0.0)
        check_in_range("codebook_weight", codebook_weight, 0.0)
        check_in_range("contrastive_weight", contrastive_weight, 0.0)
        check_in_range("usage_decay", usage_decay, 0.0, 1.0)
        if usage_decay == 1.0:
            raise ValueError("usage_decay must be < 1 (the anchor weight divides by 1 - decay)")
        if not contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {contrastive_temperature}")
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        check_backend(backend)
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.metric = metric
        self.usage_decay = float(usage_decay)
        self.anchor = anchor
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)
        self.sync_codebook = sync_codebook
        self.check_finite = bool(check_finite)
        self.backend = backend
        self.layout = TokenLayout(dim, accept_image_fmap=accept_image_fmap,
                                  channel_last=channel_last)
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("embed_prob", torch.zeros(codebook_size))

    @property
    def codebook(self) -> Tensor:
        """``[K, dim]``: the codes (the learnable ``embedding.weight``)."""
        return self.embedding.weight

    def forward(self, x: Tensor, mask: Tensor | None = None, return_loss_breakdown: bool = False,
                return_usage: bool = False):
        """Quantize x; in training, then re-anchor the codes.

        Inputs and outputs as for :meth:`VectorQuantizer.forward`: ``(quantized, indices, loss)``
        [+ LossBreakdown] [+ CodebookUsage]; loss = commitment_weight * commitment +
        codebook_weight * codebook (+ contrastive_weight * contrastive in training).
        The re-anchoring gives ``embedding.weight`` new storage, while this step's backward
        still sees the codes it was computed with (in CVQ-VAE the backward sees the moved ones).
        """
        rows, lead_shape = self.layout.to_rows(x)
        rows_mask = self.layout.mask_rows(mask, lead_shape, x.device)
        if self.check_finite:
            check_all_finite("x", x)

        # a view: the re-anchoring below swaps the parameter's storage, and the view keeps the
        # old one for this step's backward
        codebook = self.embedding.weight.view(self.codebook_size, self.dim)
        indices = nearest_code(rows.detach(), codebook.detach(), metric=self.metric,
                               backend=self.backend).indices
        quantized, commitment, codebook_loss = quantize_straight_through(
            rows, codebook, indices, mask=rows_mask, backend=self.backend)
        loss = self.commitment_weight * commitment + self.codebook_weight * codebook_loss
        contrastive = torch.zeros_like(commitment)
        if self.training and self.contrastive_weight > 0:
            contrastive = self._contrastive_loss(rows.detach(), rows_mask)
            loss = loss + self.contrastive_weight * contrastive
        if rows_mask is not None:
            indices = torch.where(rows_mask, indices, -1)
        if self.training:
            self._reanchor_codes_(rows.detach(), indices, rows_mask)

        quantized = quantized.to(x.dtype)
        if rows_mask is not None:
            quantized = torch.where(rows_mask[:, None], quantized, rows)
        outputs = (self.layout.from_rows(quantized, lead_shape), indices.reshape(lead_shape), loss)
        if return_loss_breakdown:
            outputs += (LossBreakdown.of(commitment, codebook_loss, contrastive),)
        if return_usage:
            counts = code_counts(indices[None], self.codebook_size)
            outputs += (codebook_usage_from_counts(counts),)
        return outputs

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices int64 (forward's shape; -1 gives zeros) -> codes in forward's layout."""
        if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
            raise TypeError("indices must be an int64 tensor")
        flat = indices.reshape(-1)
        codes = self.embedding.weight[flat.clamp_min(0)]
        codes = torch.where((flat >= 0)[:, None], codes, 0.0)
        return self.layout.from_rows(codes, tuple(indices.shape))

    get_output_from_indices = get_codes_from_indices

    @torch.no_grad()
    def _reanchor_codes_(self, rows: Tensor, indices: Tensor, mask: Tensor | None) -> None:
        """Usage EMA from this batch's counts, then move each code toward its anchor."""
        sync = distributed.sync_active(self.sync_codebook)
        if rows.shape[0] == 0 and not sync:
            return
        counts = code_counts(indices[None], self.codebook_size)[0]  # -1 rows are not counted
        packed = torch.cat([counts, counts.sum()[None]])
        if sync:
            distributed.all_reduce_sum_(packed)
        share = packed[:-1] / packed[-1].clamp_min(1.0)
        self.embed_prob.mul_(self.usage_decay).add_(share, alpha=1.0 - self.usage_decay)

        codebook = self.embedding.weight.detach()
        anchors = self._anchors(rows, mask, codebook).contiguous()
        if sync:
            distributed.broadcast_(anchors, 0)
        weight = torch.exp(-(self.embed_prob * self.codebook_size * 10.0)
                           / (1.0 - self.usage_decay) - 1e-3)[:, None]
        # out of place: this step's autograd graph keeps the codes it used
        self.embedding.weight.data = codebook * (1.0 - weight) + anchors * weight

    def _anchors(self, rows: Tensor, mask: Tensor | None, codebook: Tensor) -> Tensor:
        """[K, dim]: the batch feature each code moves toward (the code itself without rows)."""
        if self.anchor == "random":
            return sample_rows(rows, mask, self.codebook_size, fallback=codebook).to(codebook.dtype)
        candidates = rows if mask is None else rows[mask]  # one host sync with a mask
        if candidates.shape[0] == 0:
            return codebook.clone()
        nearest_feature = nearest_code(codebook, candidates, metric=self.metric,
                                       backend=self.backend).indices
        return candidates[nearest_feature].to(codebook.dtype)

    def _contrastive_loss(self, rows: Tensor, mask: Tensor | None) -> Tensor:
        """CVQ-VAE's contrastive term: for each code, InfoNCE of the mean similarity of its
        max(1, N // K) nearest features against the N // 2 least similar ones (gradient to the
        codebook only). Zero when the batch has fewer than 2 valid rows."""
        features = (rows if mask is None else rows[mask]).to(torch.float32)
        count = features.shape[0]
        negatives_count = count // 2
        codebook = self.embedding.weight.to(torch.float32)
        if negatives_count == 0:
            return codebook.sum() * 0.0
        if self.metric == "cosine":
            similarity = F.normalize(features, dim=-1) @ F.normalize(codebook, dim=-1).t()
        else:
            similarity = -((features * features).sum(1, keepdim=True)
                           + (codebook * codebook).sum(1) - 2.0 * features @ codebook.t())
        positives_count = max(1, count // self.codebook_size)
        positive = similarity.topk(positives_count, dim=0).values.mean(0)
        negative = similarity.topk(negatives_count, dim=0, largest=False).values
        logits = torch.cat([positive[None], negative]).t() / self.contrastive_temperature
        target = torch.zeros(self.codebook_size, dtype=torch.int64, device=logits.device)
        return F.cross_entropy(logits, target)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, metric={self.metric}, "
                f"anchor={self.anchor!r}, backend={self.backend!r}")

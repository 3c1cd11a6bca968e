"""ResidualVQ: a stack of VectorQuantizers, each quantizing what the previous ones left
(Zeghidour et al. 2021, SoundStream, Algorithm 1), with vector-quantize-pytorch's surface."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from lgvq.quantizers.layout import TokenLayout, check_in_range, check_positive_int
from lgvq.quantizers.types import LossBreakdown
from lgvq.quantizers.peers import check_backend, projected_dtype, reject_options
from lgvq.quantizers.vector_quantizer import VectorQuantizer
from lgvq_kernels.functional import check_all_finite

# Arguments ResidualVQ owns itself (layout, projections) and does not hand to its stages.
_RESERVED = ("heads", "separate_codebook_per_head", "accept_image_fmap", "channel_last",
             "check_finite", "backend", "codebook_dim", "dim", "codebook_size")


class ResidualVQ(nn.Module):
    """Residual vector quantization: ``num_quantizers`` stages, the sum of their codes.

    Args:
      dim: feature size of the input.
      num_quantizers: number of stages Q (>= 1).
      codebook_size: codes per stage K.
      codebook_dim: code size; ``nn.Linear`` projections in and out when it differs from dim.
      shared_codebook: one codebook for every stage (RQ-VAE). Its EMA statistics are summed over
        the stages and applied once per forward (vector-quantize-pytorch decays once per stage).
      quantize_dropout: probability, per training step, of keeping only the first n stages for
        the whole batch, n drawn uniformly in [cutoff + 1, Q] (``True``: every step, as
        vector-quantize-pytorch). Dropped stages get index -1, add nothing and have loss 0.
        Drawn on device, so every stage still runs (no host sync; every rank calls the same
        collectives); each rank draws from its own generator (vector-quantize-pytorch
        synchronises the draw across ranks).
      quantize_dropout_cutoff_index: stages 0..cutoff are never dropped.
      accept_image_fmap, channel_last, check_finite, backend: as for VectorQuantizer.
      **quantizer_kwargs: passed to every stage's VectorQuantizer (decay, eps,
        commitment_weight, codebook_weight, use_cosine_sim, kmeans_init, kmeans_iters,
        threshold_ema_dead_code, learnable_codebook, ema_update, rotation_trick, sync_codebook).
    """

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, *,
                 codebook_dim: int | None = None, shared_codebook: bool = False,
                 quantize_dropout: float | bool = 0.0, quantize_dropout_cutoff_index: int = 0,
                 accept_image_fmap: bool = False, channel_last: bool = True,
                 check_finite: bool = False, backend: str = "auto", **quantizer_kwargs):
        super().__init__()
        codebook_dim = dim if codebook_dim is None else codebook_dim
        check_positive_int("dim", dim)
        check_positive_int("num_quantizers", num_quantizers)
        check_positive_int("codebook_size", codebook_size)
        check_positive_int("codebook_dim", codebook_dim)
        quantize_dropout = float(quantize_dropout)
        check_in_range("quantize_dropout", quantize_dropout, 0.0, 1.0)
        check_positive_int("quantize_dropout_cutoff_index", quantize_dropout_cutoff_index,
                           minimum=0)
        if quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be < num_quantizers "
                             f"({num_quantizers}), got {quantize_dropout_cutoff_index}")
        stage_options = set(inspect.signature(VectorQuantizer).parameters) - {"unsupported"}
        reject_options(type(self).__name__,
                       {k: v for k, v in quantizer_kwargs.items() if k not in stage_options})
        reserved = sorted(set(quantizer_kwargs) & set(_RESERVED))
        if reserved:
            raise ValueError(f"ResidualVQ does not accept {reserved} for its stages (heads must "
                             "be 1; layout, projections and backend are set on ResidualVQ)")
        check_backend(backend)

        self.dim = dim
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.shared_codebook = bool(shared_codebook)
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.check_finite = bool(check_finite)
        self.backend = backend
        self.layout = TokenLayout(dim, accept_image_fmap=accept_image_fmap,
                                  channel_last=channel_last)
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()

        # every stage is built, also with a shared codebook (then only the first is kept), so
        # that construction draws as many random numbers as vector-quantize-pytorch's and a
        # script's later draws (its data) are the same
        stages = [VectorQuantizer(codebook_dim, codebook_size, check_finite=False,
                                  backend=backend, **quantizer_kwargs)
                  for _ in range(num_quantizers)]
        self.quantizers = nn.ModuleList(stages[:1] if self.shared_codebook else stages)

    def quantizer(self, stage: int) -> VectorQuantizer:
        return self.quantizers[0 if self.shared_codebook else stage]

    @property
    def codebooks(self) -> Tensor:
        """``[num_quantizers, K, codebook_dim]`` (the one shared codebook repeated when shared)."""
        return torch.stack([self.quantizer(stage).codebook for stage in range(self.num_quantizers)])

    def forward(self, x: Tensor, mask: Tensor | None = None, return_loss_breakdown: bool = False):
        """Quantize x with every stage.

        x and mask as for :meth:`VectorQuantizer.forward`. Returns ``(quantized, indices,
        losses)`` [+ LossBreakdown of ``[Q]`` tensors]: quantized has x's shape and dtype (the
        sum of the stages' codes, projected back; masked rows are x unchanged); indices int64
        of x's shape without the feature axis plus a trailing ``[Q]`` axis (-1 for masked or
        dropped rows); losses float32 ``[Q]``, each stage's weighted loss (sum them for the
        total).
        """
        rows, lead_shape = self.layout.to_rows(x)
        rows_mask = self.layout.mask_rows(mask, lead_shape, x.device)
        if self.check_finite:
            check_all_finite("x", x)
        active_stages = self._active_stages(lead_shape, rows.shape[0], rows.device)

        residual = self.project_in(rows)
        quantized_sum = torch.zeros_like(residual, dtype=torch.promote_types(residual.dtype,
                                                                              torch.float32))
        all_indices, losses, commitments, codebook_losses, searched = [], [], [], [], []
        for stage in range(self.num_quantizers):
            quantizer = self.quantizer(stage)
            stage_mask = _combine_masks(rows_mask, None if active_stages is None
                                        else active_stages[:, stage])
            result = quantizer.quantize_rows(residual, stage_mask,
                                             update_codebook=not self.shared_codebook)
            stage_codes = result.quantized
            if stage_mask is not None:  # masked or dropped rows add nothing
                stage_codes = torch.where(stage_mask[:, None], stage_codes, 0.0)
            quantized_sum = quantized_sum + stage_codes
            residual = residual - stage_codes.detach()
            all_indices.append(result.indices[:, 0])
            loss = quantizer.commitment_weight * result.commitment
            if quantizer.learnable_codebook:
                loss = loss + quantizer.codebook_weight * result.codebook_loss
            losses.append(loss)
            commitments.append(result.commitment)
            codebook_losses.append(result.codebook_loss)
            searched.append((result.searched_rows[0], result.searched_masks[0],
                             result.searched_indices[0]))

        if self.training and self.shared_codebook:
            self._update_shared_codebook_(searched)

        # the stages sum in float32; project_out has the module's dtype (.half(), .bfloat16())
        quantized = self.project_out(quantized_sum.to(residual.dtype)).to(x.dtype)
        if rows_mask is not None:
            quantized = torch.where(rows_mask[:, None], quantized, rows)
        indices = torch.stack(all_indices, dim=-1).reshape(*lead_shape, self.num_quantizers)
        losses = torch.stack(losses)
        if not self.training:  # vector-quantize-pytorch's convention: no loss in eval mode
            losses = torch.zeros_like(losses)
        outputs = (self.layout.from_rows(quantized, lead_shape), indices, losses)
        if return_loss_breakdown:
            commitment = torch.stack(commitments)
            outputs += (LossBreakdown.of(commitment, torch.stack(codebook_losses)),)
        return outputs

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # vector-quantize-pytorch's ResidualVQ keeps its stages in ``layers`` (with a shared
        # codebook every stage holds the same tensors: the first one is kept)
        marker = prefix + "layers."
        for key in [k for k in state_dict if k.startswith(marker)]:
            stage, _, rest = key[len(marker):].partition(".")
            value = state_dict.pop(key)
            if int(stage) < len(self.quantizers):
                state_dict[f"{prefix}quantizers.{stage}.{rest}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices int64 ``[..., q]`` (q <= Q: the first q stages; -1 gives zeros) -> codes
        ``[q, ..., codebook_dim]`` (channel last, before project_out)."""
        if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
            raise TypeError("indices must be an int64 tensor")
        if indices.dim() < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(f"indices must be [..., q] with 1 <= q <= {self.num_quantizers}, "
                             f"got shape {tuple(indices.shape)}")
        return torch.stack([self.quantizer(stage).get_codes_from_indices(indices[..., stage])
                            for stage in range(indices.shape[-1])])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for ``indices`` ``[..., q]``: the summed codes through
        project_out, in forward's layout (``[B, dim, H, W]`` for image feature maps)."""
        summed = self.get_codes_from_indices(indices).sum(0)
        lead_shape = tuple(summed.shape[:-1])
        rows = self.project_out(projected_dtype(self, summed.reshape(-1, self.codebook_dim)))
        return self.layout.from_rows(rows, lead_shape)

    def _active_stages(self, lead_shape: tuple[int, ...], rows_count: int,
                       device: torch.device) -> Tensor | None:
        """bool ``[M, Q]``: which stages each row uses this step (None: all of them)."""
        if not (self.training and self.quantize_dropout > 0 and self.num_quantizers > 1):
            return None
        # one draw for the batch (vector-quantize-pytorch's semantics)
        dropped = torch.rand((), device=device) < self.quantize_dropout
        last_stage = torch.randint(self.quantize_dropout_cutoff_index, self.num_quantizers,
                                   (), device=device)
        last_stage = torch.where(dropped, last_stage, self.num_quantizers - 1)
        active = torch.arange(self.num_quantizers, device=device) <= last_stage
        return active.expand(rows_count, self.num_quantizers)

    def _update_shared_codebook_(self, searched: list) -> None:
        rows, masks, indices = zip(*searched)
        if all(mask is None for mask in masks):
            mask = None
        else:
            mask = torch.cat([torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
                              if m is None else m for r, m in zip(rows, masks)])
        self.quantizers[0].update_codebooks_([torch.cat(rows)], [mask], [torch.cat(indices)])


def _combine_masks(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return first & second

"""VectorQuantizer: the vector-quantize-pytorch ``VectorQuantize`` surface on lgvq's fused ops.

The search is ``nearest_code`` (no N x K distance matrix), the output and both VQ losses come
from ``quantize_straight_through`` (one fused forward and backward), and the EMA codebook update
is ``codebook_statistics`` + ``codebook_ema_update_`` (on device, no host sync; one packed
all-reduce under torch.distributed). This module only arranges tensors and passes ``backend``
through; it never picks a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq.quantizers import distributed
from lgvq.quantizers.kmeans import kmeans, sample_rows
from lgvq.quantizers.layout import TokenLayout, check_in_range, check_positive_int
from lgvq.quantizers.peers import (
    check_backend,
    convert_vector_quantize_state_dict,
    projected_dtype,
    reject_options,
)
from lgvq.quantizers.rotation import rotate_onto_codes
from lgvq.quantizers.snapshot import snapshot
from lgvq.quantizers.types import (
    CodebookUsage,
    LossBreakdown,
    QuantizedRows,
    code_counts,
    codebook_usage_from_counts,
)
from lgvq_kernels.functional import (
    check_all_finite,
    codebook_ema_update_,
    codebook_statistics,
    nearest_code,
    quantize_straight_through,
)

class VectorQuantizer(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    Args:
      dim: feature size of the input (>= 1).
      codebook_size: number of codes K (>= 1).
      codebook_dim: size of each code; when ``codebook_dim * heads != dim`` the input goes
        through ``nn.Linear(dim, codebook_dim * heads)`` and the output back through
        ``nn.Linear(codebook_dim * heads, dim)``. Default: ``dim``.
      heads: each vector is split into ``heads`` sub-vectors quantized independently.
      separate_codebook_per_head: one codebook per head instead of one shared by all heads.
      decay: EMA decay of the codebook statistics, in [0, 1] (vector-quantize-pytorch: 0.8).
      eps: Laplace smoothing of the EMA cluster sizes (> 0).
      ema_update: update the codebook by EMA of the assigned vectors. Default (None): True unless
        ``learnable_codebook``.
      learnable_codebook: the codebook is an ``nn.Parameter`` trained by the codebook loss
        (VQ-VAE); mutually exclusive with ``ema_update``.
      commitment_weight: beta, the weight of the commitment loss |x - sg(e)|^2.
      codebook_weight: weight of the codebook loss |sg(x) - e|^2 (learnable codebook only).
      use_cosine_sim: search by cosine similarity; inputs are normalised and the codebook is
        kept unit-norm (renormalised after every EMA update; a learnable one is normalised
        when used), so the outputs are unit vectors.
      kmeans_init: on the first training forward, run k-means on the batch (initial centroids
        drawn from it) and use the centroids as the codebook and to initialise the EMA state.
      kmeans_iters: k-means iterations.
      threshold_ema_dead_code: codes whose EMA cluster size falls below this are replaced by
        vectors drawn at random from the batch (0 disables).
      rotation_trick: gradient through the rotation trick (Fifty et al. 2024) instead of
        straight-through. Default (None): on for dim > 1, as in vector-quantize-pytorch.
      sync_codebook: keep the codebook identical on every rank under torch.distributed (EMA
        statistics all-reduced as one packed buffer, k-means statistics all-reduced with the
        initial centroids broadcast, dead-code replacements broadcast from rank 0). None: on
        when a process group with more than one rank is initialised.
      accept_image_fmap: inputs are feature maps ``[B, dim, H, W]``.
      channel_last: inputs are ``[B, N, dim]`` (or ``[B, dim]``); False: ``[B, dim, N]``.
      check_finite: raise ValueError when x holds NaN/Inf. Off by default: the check is
        one host sync per forward (vector-quantize-pytorch does not check either).
      backend: kernel backend of every op: "auto", "reference", "native" or "triton".

    State: ``codebooks`` float32 ``[C, K, codebook_dim]`` (C = heads with separate codebooks,
    else 1; a buffer, or an ``nn.Parameter`` when learnable), ``cluster_size`` ``[C, K]`` and
    ``embed_sum`` ``[C, K, codebook_dim]`` float32 EMA buffers (initialised to ones and to the
    codebook, like vector-quantize-pytorch). ``module.half()`` leaves them float32.

    Differences from vector-quantize-pytorch (same settings, same initial codebook: same
    indices, outputs, losses, gradients and EMA codebook, see tests/modules):
      - ema_update defaults to ``not learnable_codebook`` (theirs must be turned off by hand for
        a learnable codebook). Masked rows output x (theirs: zeros).
      - In eval mode the loss is 0 as theirs, but return_loss_breakdown still measures the
        terms (theirs: zeros).
      - get_output_from_indices with heads sharing one codebook returns forward's output
        ``[..., dim]`` (theirs: the codes ``[..., heads, codebook_dim]`` unprojected, and an
        error when there is a projection).
      - Learnable codebook: loss = beta * commitment + codebook_weight * codebook. Theirs
        is commitment_weight * mse with gradient to both sides: the same gradients when
        codebook_weight == commitment_weight, twice the value. Cosine + learnable is allowed.
      - k-means: a centroid without members keeps cluster size 1 (theirs: 0, so the next EMA
        update sends the code to zero). Dead codes restart with cluster size 1 (theirs: the
        threshold), from batch rows drawn with replacement; under DDP from rank 0's batch.
      - Not offered: orthogonal_reg_*, codebook_diversity_*, stochastic_sample_codes,
        sample_codebook_temp, straight_through (Gumbel), directional_reparam, affine_param,
        accept_3d_fmap, layernorm_after_project_in, freeze_codebook, manual_ema_update,
        in_place_codebook_optimizer, sync_update_v, vq_bridge, commitment_use_cross_entropy_loss,
        return_zeros_for_masked_padding, and forward's indices/lens/topk/ema_update_weight.
    """

    def __init__(self, dim: int, codebook_size: int, *, codebook_dim: int | None = None,
                 heads: int = 1, separate_codebook_per_head: bool = False, decay: float = 0.8,
                 eps: float = 1e-5, ema_update: bool | None = None,
                 learnable_codebook: bool = False, commitment_weight: float = 1.0,
                 codebook_weight: float = 1.0, use_cosine_sim: bool = False,
                 kmeans_init: bool = False, kmeans_iters: int = 10,
                 threshold_ema_dead_code: float = 0.0, rotation_trick: bool | None = None,
                 sync_codebook: bool | None = None, accept_image_fmap: bool = False,
                 channel_last: bool = True, check_finite: bool = False, backend: str = "auto",
                 **unsupported):
        super().__init__()
        reject_options(type(self).__name__, unsupported)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        ema_update = (not learnable_codebook) if ema_update is None else bool(ema_update)
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        check_positive_int("codebook_dim", codebook_dim)
        check_positive_int("heads", heads)
        check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        check_in_range("decay", decay, 0.0, 1.0)
        check_in_range("commitment_weight", commitment_weight, 0.0)
        check_in_range("codebook_weight", codebook_weight, 0.0)
        check_in_range("threshold_ema_dead_code", threshold_ema_dead_code, 0.0)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if ema_update and learnable_codebook:
            raise ValueError("ema_update and learnable_codebook are mutually exclusive: the EMA "
                             "update would overwrite what the codebook loss learns")
        check_backend(backend)

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        self.num_codebooks = heads if separate_codebook_per_head else 1
        self.decay = float(decay)
        self.eps = float(eps)
        self.ema_update = ema_update
        self.learnable_codebook = bool(learnable_codebook)
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.metric = "cosine" if use_cosine_sim else "l2"
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        # vector-quantize-pytorch's default: on when there is more than one feature
        self.rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        self.sync_codebook = sync_codebook
        self.check_finite = bool(check_finite)
        self.backend = backend
        self.layout = TokenLayout(dim, accept_image_fmap=accept_image_fmap,
                                  channel_last=channel_last)

        features = codebook_dim * heads
        self.has_projections = features != dim
        self.project_in = nn.Linear(dim, features) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(features, dim) if self.has_projections else nn.Identity()

        codebooks = torch.empty(self.num_codebooks, codebook_size, codebook_dim)
        nn.init.kaiming_uniform_(codebooks)
        if self.use_cosine_sim:
            codebooks = F.normalize(codebooks, dim=-1)
        if self.learnable_codebook:
            self.codebooks = nn.Parameter(codebooks)
        else:
            self.register_buffer("codebooks", codebooks)
        self.register_buffer("cluster_size", torch.ones(self.num_codebooks, codebook_size))
        if self.ema_update:
            self.register_buffer("embed_sum", codebooks.clone())
        self.register_buffer("kmeans_done", torch.tensor(not self.kmeans_init))
        # the buffer's value as a Python bool, so forward never reads it back from the device
        # (a host sync, and a graph break under torch.compile(fullgraph=True)); set again
        # whenever a state dict is loaded
        self._kmeans_done_cache = not self.kmeans_init

    # ----------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None, return_loss_breakdown: bool = False,
                return_usage: bool = False):
        """Quantize x.

        Args:
          x: ``[B, N, dim]`` or ``[B, dim]`` (channel_last), ``[B, dim, N]`` (channel_last=False)
            or ``[B, dim, H, W]`` (accept_image_fmap); float32/float16/bfloat16/float64.
          mask: optional bool of x's shape without the feature axis (``[B, N]``, ``[B, H, W]``):
            False rows are left out of the losses and the codebook update, their output is x
            unchanged and their index -1.
          return_loss_breakdown: also return a :class:`LossBreakdown` of unweighted terms.
          return_usage: also return the batch's :class:`CodebookUsage`.

        Returns ``(quantized, indices, loss)`` [+ LossBreakdown] [+ CodebookUsage]:
          quantized: x's shape and dtype; the codes (projected back), gradient to x.
          indices: int64 x's shape without the feature axis, with a trailing ``heads`` axis
            when heads > 1.
          loss: float32 0-d, ``commitment_weight * commitment`` (+ ``codebook_weight *
            codebook`` for a learnable codebook); 0 in eval mode, as vector-quantize-pytorch.
        In training mode the codebook is updated (EMA, k-means init, dead-code replacement).
        """
        rows, lead_shape = self.layout.to_rows(x)
        rows_mask = self.layout.mask_rows(mask, lead_shape, x.device)
        if self.check_finite:
            check_all_finite("x", x)

        result = self.quantize_rows(self.project_in(rows), rows_mask)

        quantized = self.project_out(result.quantized).to(x.dtype)
        if rows_mask is not None:  # padding passes through unchanged
            quantized = torch.where(rows_mask[:, None], quantized, rows)
        quantized = self.layout.from_rows(quantized, lead_shape)
        indices = result.indices.reshape(*lead_shape, self.heads)
        if self.heads == 1:
            indices = indices[..., 0]
        loss = self.commitment_weight * result.commitment
        if self.learnable_codebook:
            loss = loss + self.codebook_weight * result.codebook_loss
        if not self.training:  # vector-quantize-pytorch's convention: no loss in eval mode
            loss = torch.zeros_like(loss)

        outputs = (quantized, indices, loss)
        if return_loss_breakdown:
            outputs += (LossBreakdown.of(result.commitment, result.codebook_loss),)
        if return_usage:
            outputs += (self.usage_from_indices(result.indices),)
        return outputs

    @property
    def codebook(self) -> Tensor:
        """The codes: ``[K, codebook_dim]``, or ``[heads, K, codebook_dim]`` with separate
        codebooks per head."""
        return self.codebooks if self.separate_codebook_per_head else self.codebooks[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        """Replace the codes (``codebook``'s shape); the EMA state restarts from them
        (cluster size 1, embed sum = codes), as at construction."""
        expected = tuple(self.codebook.shape)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codes must have shape {expected}, got {tuple(codes.shape)}")
        with torch.no_grad():
            self.codebooks.copy_(codes.reshape(self.codebooks.shape))
            self.cluster_size.fill_(1.0)
            if self.ema_update:
                self.embed_sum.copy_(self.codebooks)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes of ``indices`` (the shape forward returns; -1 gives zeros), in forward's layout
        with ``heads * codebook_dim`` channels, before ``project_out``."""
        codes, lead_shape = self._codes_as_rows(indices)
        return self.layout.from_rows(codes, lead_shape)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward would output for ``indices``: the codes through ``project_out``, in
        forward's layout with ``dim`` channels."""
        codes, lead_shape = self._codes_as_rows(indices)
        return self.layout.from_rows(self.project_out(projected_dtype(self, codes)), lead_shape)

    def usage_from_indices(self, indices: Tensor) -> CodebookUsage:
        """indices int64 ``[M, heads]`` (-1 ignored) -> usage of each codebook, averaged."""
        per_codebook = indices.t() if self.separate_codebook_per_head else indices.reshape(1, -1)
        return codebook_usage_from_counts(code_counts(per_codebook, self.codebook_size))

    # ----------------------------------------------------------------------------------------
    # rows in, rows out (also the building block of ResidualVQ)
    # ----------------------------------------------------------------------------------------

    def quantize_rows(self, features: Tensor, mask: Tensor | None, *,
                      update_codebook: bool = True) -> QuantizedRows:
        """Quantize projected rows ``[M, heads * codebook_dim]`` (mask bool ``[M]`` or None).

        In training mode this runs k-means init when due and, with ``update_codebook``, the
        codebook update; ResidualVQ with a shared codebook passes False and calls
        :meth:`update_codebooks_` once with every stage's rows.
        """
        searched_rows, searched_masks = self._split_by_codebook(features, mask)
        if self.training and self.kmeans_init and not self._is_kmeans_done():
            self._kmeans_init_(searched_rows, searched_masks)
        codebooks = self._codebooks_for_forward()

        quantized, indices, commitments, codebook_losses = [], [], [], []
        for rows, rows_mask, codebook in zip(searched_rows, searched_masks, codebooks):
            nearest = nearest_code(rows.detach(), codebook.detach(), metric=self.metric,
                                   backend=self.backend).indices
            step = quantize_straight_through(rows, codebook, nearest, mask=rows_mask,
                                             backend=self.backend)
            output = step.quantized
            if self.rotation_trick and self.training and rows.requires_grad:
                output = rotate_onto_codes(rows.to(output.dtype), output)
            quantized.append(output)
            indices.append(nearest)
            commitments.append(step.commitment_loss)
            codebook_losses.append(step.codebook_loss)

        searched_rows = [rows.detach() for rows in searched_rows]
        if self.training and update_codebook:
            self.update_codebooks_(searched_rows, searched_masks, indices)

        rows_count, features_count = features.shape
        if self.separate_codebook_per_head:
            quantized_rows = torch.stack(quantized, dim=1).reshape(rows_count, features_count)
            index_rows = torch.stack(indices, dim=1)
        else:
            quantized_rows = quantized[0].reshape(rows_count, features_count)
            index_rows = indices[0].reshape(rows_count, self.heads)
        if mask is not None:
            index_rows = torch.where(mask[:, None], index_rows, -1)
        # the codes come back float32 (cosine search and the float32 codebook); a module moved
        # with .half() has a half project_out
        quantized_rows = quantized_rows.to(features.dtype)
        return QuantizedRows(quantized_rows, index_rows,
                             torch.stack(commitments).float().mean(),
                             torch.stack(codebook_losses).float().mean(),
                             searched_rows, searched_masks, indices)

    @torch.no_grad()
    def update_codebooks_(self, searched_rows: list, searched_masks: list,
                          searched_indices: list) -> None:
        """Training-time codebook update from the rows each codebook searched (per codebook:
        rows ``[M_c, codebook_dim]``, mask ``[M_c]`` or None, indices int64 ``[M_c]``).

        EMA (``codebook_statistics`` -> one all-reduce of ``[C, K, codebook_dim + 1]`` when
        synchronised -> ``codebook_ema_update_``), then unit norm for cosine; dead codes take
        rows drawn from the batch (broadcast from rank 0 when synchronised). Without EMA only the
        cluster sizes are tracked, for dead-code replacement. No host synchronisation.
        """
        if not (self.ema_update or self.threshold_ema_dead_code > 0):
            return
        sync = distributed.sync_active(self.sync_codebook)
        if searched_rows[0].shape[0] == 0 and not sync:
            return  # nothing to learn from; under sync the empty rank still joins the all-reduce
        stats = torch.stack([
            codebook_statistics(rows, indices, self.codebook_size, mask=rows_mask,
                                backend=self.backend)
            for rows, rows_mask, indices in zip(searched_rows, searched_masks, searched_indices)
        ])
        if sync:
            distributed.all_reduce_sum_(stats)
        replacement = self._dead_code_candidates(searched_rows, searched_masks, sync)

        if not self.ema_update:
            self._replace_dead_codes_(stats[..., -1], replacement)
            return
        for index in range(self.num_codebooks):
            codebook_ema_update_(
                stats[index], self.cluster_size[index], self.embed_sum[index],
                self.codebooks[index], decay=self.decay, eps=self.eps,
                dead_threshold=self.threshold_ema_dead_code,
                replacement=None if replacement is None else replacement[index],
                backend=self.backend)
        if self.use_cosine_sim:
            self.codebooks.copy_(F.normalize(self.codebooks, dim=-1))

    # ----------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------

    def _split_by_codebook(self, features: Tensor, mask: Tensor | None):
        """[M, heads * d] -> per codebook: rows [M_c, d] (normalised for cosine) and mask."""
        rows_count = features.shape[0]
        expected = self.heads * self.codebook_dim
        if features.dim() != 2 or features.shape[1] != expected:
            raise ValueError(f"features must be [M, {expected}], got {tuple(features.shape)}")
        per_head = features.reshape(rows_count, self.heads, self.codebook_dim)
        if self.use_cosine_sim:
            work_dtype = torch.promote_types(per_head.dtype, torch.float32)
            per_head = F.normalize(per_head.to(work_dtype), dim=-1)
        if self.separate_codebook_per_head:
            return [per_head[:, head] for head in range(self.heads)], [mask] * self.heads
        head_mask = None if mask is None else mask.repeat_interleave(self.heads)
        return [per_head.reshape(rows_count * self.heads, self.codebook_dim)], [head_mask]

    def _codebooks_for_forward(self) -> Tensor:
        """[C, K, d]: the codes this forward quantizes with."""
        if self.learnable_codebook:
            return F.normalize(self.codebooks, dim=-1) if self.use_cosine_sim else self.codebooks
        if self.training and (self.ema_update or self.threshold_ema_dead_code > 0):
            # the update at the end of this forward rewrites the buffer in place; the backward
            # of this step needs the codes it was computed with (a copy torch.compile keeps)
            return snapshot(self.codebooks)
        return self.codebooks

    def _dead_code_candidates(self, searched_rows: list, searched_masks: list,
                              sync: bool) -> Tensor | None:
        if self.threshold_ema_dead_code <= 0:
            return None
        candidates = torch.stack([
            sample_rows(rows, rows_mask, self.codebook_size, fallback=codebook.detach())
            .to(torch.float32)
            for rows, rows_mask, codebook in zip(searched_rows, searched_masks, self.codebooks)
        ]).contiguous()
        if sync:
            distributed.broadcast_(candidates, 0)
        return candidates

    def _replace_dead_codes_(self, counts: Tensor, replacement: Tensor | None) -> None:
        """No EMA codebook (learnable or frozen): track cluster sizes by EMA of the counts
        ``[C, K]`` and move dead codes onto ``replacement`` rows ``[C, K, d]``."""
        self.cluster_size.mul_(self.decay).add_(counts.to(torch.float32), alpha=1.0 - self.decay)
        if replacement is None:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code
        self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size),
                                            self.cluster_size))
        fresh = torch.where(dead[..., None], replacement.to(self.codebooks.dtype),
                            self.codebooks.detach())
        if self.learnable_codebook:
            # swapped out of place: this step's autograd graph keeps the codes it used
            self.codebooks.data = fresh
        else:
            self.codebooks.copy_(fresh)

    def _is_kmeans_done(self) -> bool:
        return self._kmeans_done_cache

    @torch.no_grad()
    def _kmeans_init_(self, searched_rows: list, searched_masks: list) -> None:
        sync = distributed.sync_active(self.sync_codebook)
        results = [kmeans(rows, self.codebook_size, self.kmeans_iters, metric=self.metric,
                          mask=rows_mask, backend=self.backend, sync=sync)
                   for rows, rows_mask in zip(searched_rows, searched_masks)]
        if any(result is None for result in results):
            return  # no valid row anywhere: try again on the next batch
        for index, (centroids, counts) in enumerate(results):
            # a centroid without members still stands for one vector, so the next EMA step
            # cannot shrink it to zero
            cluster_size = counts.clamp_min(1.0)
            self.codebooks[index].copy_(centroids)
            self.cluster_size[index].copy_(cluster_size)
            if self.ema_update:
                self.embed_sum[index].copy_(centroids * cluster_size[:, None])
        self.kmeans_done.fill_(True)
        self._kmeans_done_cache = True

    def _codes_as_rows(self, indices: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
            raise TypeError("indices must be an int64 tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if self.heads > 1:
            if indices.dim() < 2 or indices.shape[-1] != self.heads:
                raise ValueError(f"indices must end with a heads axis of size {self.heads}, "
                                 f"got shape {tuple(indices.shape)}")
            lead_shape = tuple(indices.shape[:-1])
        else:
            lead_shape = tuple(indices.shape)
        per_head = indices.reshape(-1, self.heads)
        safe = per_head.clamp_min(0)
        codebooks = self._codebooks_for_forward() if self.learnable_codebook else self.codebooks
        if self.separate_codebook_per_head:
            heads = torch.arange(self.heads, device=indices.device)
            codes = codebooks[heads[None, :], safe]
        else:
            codes = codebooks[0][safe]
        codes = torch.where((per_head >= 0)[..., None], codes, 0.0)
        return codes.reshape(per_head.shape[0], -1), lead_shape

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a trained vector-quantize-pytorch VectorQuantize loads as it is
        convert_vector_quantize_state_dict(state_dict, prefix, ema_update=self.ema_update)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._kmeans_done_cache = bool(self.kmeans_done)  # one host read, at load time

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the EMA state: keep those buffers float32, moved to
        # wherever fn sent them
        float32_state = {name: self._buffers[name] for name in ("codebooks", "cluster_size",
                                                                 "embed_sum")
                         if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in float32_state.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        update = "ema" if self.ema_update else ("learnable" if self.learnable_codebook
                                                else "frozen")
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"codebook_dim={self.codebook_dim}, heads={self.heads}, metric={self.metric}, "
                f"update={update}, backend={self.backend!r}")

"""Evaluation measures of LG-VQ that need no external weights (docs/method.md, "Evaluation"):
PSNR, codebook usage, masked-word Recall@1, word-to-code relation MSE and image→text retrieval
with e_CLS.

Every function takes tensors (or a small callable) and builds no model. Measures that are
accumulated over an evaluation set have a meter: ``update`` per batch, ``compute`` at the end.

Shapes: B images or captions, T text length, V vocabulary size, K codebook size, N evaluation
pairs, G embedding width, C text-token width, M visual tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

import lgvq_kernels
from lgvq.evaluation.checks import check_bool_mask, check_tensor
from lgvq.text.masking import mask_word_tokens

__all__ = [
    "PSNR_CAP_DB",
    "CodebookUsageMeter",
    "CodebookUsageStats",
    "MaskedWordRecall",
    "MaskedWordRecallMeter",
    "RelationMSEMeter",
    "codebook_usage",
    "masked_word_recall",
    "psnr",
    "relation_mse",
    "retrieval_accuracy",
]


# --------------------------------------------------------------------------------------------
# PSNR

PSNR_CAP_DB = 100.0
"""PSNR given to an image identical to its target (MSE 0), and the ceiling of every PSNR: a
finite cap keeps means over images and seeds finite (an 8-bit image that differs from its target
by one level in one pixel of 256² already scores about 96 dB at data range 2)."""


def psnr(reconstruction: Tensor, target: Tensor, data_range: float = 2.0, *,
         clamp_range: tuple[float, float] | None = (-1.0, 1.0),
         max_db: float = PSNR_CAP_DB) -> Tensor:
    """Peak signal-to-noise ratio of each image, in dB.

    PSNR = 10 log10(data_range² / MSE), MSE over all channels and pixels of one image, computed
    in float64. Both images are first clamped to ``clamp_range`` (decoders overshoot [-1, 1]; the
    saved image would be clipped too). The result is capped at ``max_db`` (default
    :data:`PSNR_CAP_DB` = 100 dB), which is also the value for identical images.

    Args:
        reconstruction: float ``[B, C, H, W]`` (any ``[B, ...]``) decoded images in [-1, 1].
        target: float, the shape of ``reconstruction``; the input images.
        data_range: max − min of the pixel range: 2 for [-1, 1], 1 for [0, 1], 255 for 8 bits.
        clamp_range: ``(low, high)`` to clamp both images to, or None to leave them as they are.
        max_db: the cap (a float; ``math.inf`` gives inf for identical images).

    Returns:
        float32 ``[B]``: one PSNR per image (the caller reports the mean).
    """
    check_tensor("reconstruction", reconstruction)
    check_tensor("target", target)
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    if reconstruction.dim() < 2 or reconstruction.shape[0] == 0:
        raise ValueError(f"reconstruction must be [B, ...] with B >= 1 and at least one value per "
                         f"image, got shape {tuple(reconstruction.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    reconstruction = reconstruction.detach().to(torch.float64)
    target = target.detach().to(device=reconstruction.device, dtype=torch.float64)
    if clamp_range is not None:
        low, high = clamp_range
        reconstruction = reconstruction.clamp(low, high)
        target = target.clamp(low, high)
    mse = (reconstruction - target).square().flatten(1).mean(1)
    # mse == 0 gives +inf here; the cap turns it into max_db.
    value = 10.0 * torch.log10(data_range ** 2 / mse)
    return value.clamp(max=max_db).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Codebook usage

class CodebookUsageStats(NamedTuple):
    """How the codes of one codebook were used over an evaluation set.

    used_fraction: fraction of the K codes chosen at least once (the paper's "codebook usage").
    perplexity: exp(entropy of the code frequencies), natural log: K when every code is chosen
      equally often, 1 when one code takes every position.
    counts: int64 ``[K]``: how often each code was chosen.
    """

    used_fraction: float
    perplexity: float
    counts: Tensor


def _usage_stats(counts: Tensor) -> CodebookUsageStats:
    total = int(counts.sum())
    if total == 0:
        raise ValueError("codebook usage needs at least one index (none was given)")
    probabilities = counts.to(torch.float64) / total
    entropy = -torch.special.xlogy(probabilities, probabilities).sum()
    used = int((counts > 0).sum())
    return CodebookUsageStats(used_fraction=used / counts.numel(),
                              perplexity=float(entropy.exp()), counts=counts)


def _count_codes(indices: Tensor, codebook_size: int) -> Tensor:
    check_tensor("indices", indices)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
    flat = indices.detach().reshape(-1).to(torch.int64)
    if flat.numel() and bool(((flat < -1) | (flat >= codebook_size)).any()):
        raise ValueError(f"indices must lie in [0, {codebook_size}) (-1 marks an ignored "
                         f"position), got values in [{int(flat.min())}, {int(flat.max())}]")
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(indices: Tensor, codebook_size: int) -> CodebookUsageStats:
    """Codebook usage and perplexity of a set of code indices.

    Args:
        indices: integer tensor of any shape (e.g. ``[B, h, w]``) with values in
            [0, codebook_size); -1 marks a position to ignore. With several codebooks (heads,
            residual levels), call once per codebook.
        codebook_size: K.

    Returns:
        :class:`CodebookUsageStats` (used fraction, perplexity, int64 counts ``[K]``).
    """
    return _usage_stats(_count_codes(indices, codebook_size))


class CodebookUsageMeter:
    """Streaming :func:`codebook_usage` over the batches of an evaluation set.

    ``update(indices)`` adds a batch's code counts (int64, on the indices' device: no host
    synchronisation beyond the range check); ``compute()`` gives the usage of everything seen.
    ``counts`` may be all-reduced across processes before ``compute``.
    """

    def __init__(self, codebook_size: int):
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
        self.codebook_size = codebook_size
        self.counts: Tensor | None = None

    def update(self, indices: Tensor) -> None:
        counts = _count_codes(indices, self.codebook_size)
        self.counts = counts if self.counts is None else self.counts + counts.to(self.counts)

    def compute(self) -> CodebookUsageStats:
        if self.counts is None:
            raise ValueError("CodebookUsageMeter.compute() called before any update()")
        return _usage_stats(self.counts.cpu())

    def reset(self) -> None:
        self.counts = None


# --------------------------------------------------------------------------------------------
# Masked-word Recall@1

class MaskedWordRecall(NamedTuple):
    """Outcome of masked-word prediction over one batch or a whole evaluation set.

    hits: masked positions whose top-1 prediction is the original token.
    total: masked positions scored (``num_masked`` × captions scored).
    skipped: captions with fewer than ``num_masked`` candidate tokens (not scored).
    """

    hits: int
    total: int
    skipped: int

    @property
    def recall(self) -> float:
        """Recall@1 = hits / total (NaN when nothing was scored)."""
        return self.hits / self.total if self.total else math.nan


def masked_word_recall(
    predict_fn: Callable[[Tensor, Tensor], Tensor],
    token_ids: Tensor,
    attention_mask: Tensor,
    candidate_mask: Tensor,
    num_masked: int,
    generator: torch.Generator | None = None,
    *,
    mask_token_id: int | None = None,
    vocabulary: Tensor | None = None,
) -> MaskedWordRecall:
    """Masked-word Recall@1 with exactly ``num_masked`` masked words per caption.

    The paper masks 1 or 3 words of each caption, asks the masked-text decoder (conditioned on
    the image's visual tokens) to predict them, and reports Recall@1:

        Recall@1 = (masked positions where argmax_v logits[b, t, v] == token_ids[b, t])
                   / (all masked positions),

    pooled over every masked position of every scored caption (not averaged per caption).

    For each caption, ``num_masked`` positions are drawn uniformly without replacement among its
    candidates (``candidate_mask & attention_mask``: e.g. attribute words, or every real
    non-special token). A caption with fewer candidates is skipped and counted in ``skipped``;
    its row is still passed to ``predict_fn`` (with nothing masked) and its logits are ignored.
    ``predict_fn`` runs under ``torch.no_grad()``.

    Args:
        predict_fn: ``predict_fn(masked_ids, masked) -> logits``, with masked_ids int64
            ``[B, T]`` (the caption with masked slots set to ``mask_token_id``), masked bool
            ``[B, T]`` (the masked slots) and logits float ``[B, T, V]``. Typically a closure over
            the batch's visual tokens Zvt that runs the MaskedTextDecoder + MaskedWordHead:
            "mask, then encode" encodes ``masked_ids``; the paper's behaviour encodes the
            unmasked caption and lets the decoder replace the ``masked`` slots. Row b of the
            arguments is caption b of ``token_ids``.
        token_ids: int64 ``[B, T]`` original token ids (the targets).
        attention_mask: bool ``[B, T]``, True on real tokens.
        candidate_mask: bool ``[B, T]``, True on the tokens that may be masked (see
            :func:`lgvq.evaluation.words.word_token_mask`).
        num_masked: k >= 1 words masked per caption (the paper: 1 and 3).
        generator: source of randomness for the choice of words (same state, same choice).
        mask_token_id: the id written into masked slots of ``masked_ids``. None leaves the ids
            unchanged (for a ``predict_fn`` that only uses ``masked``; it must then not read the
            ids at masked slots).
        vocabulary: int64 ``[V]``, the token id each logit column scores, for a head over part
            of the vocabulary (``MaskedWordHead.vocabulary``); None: column v scores id v.

    Returns:
        :class:`MaskedWordRecall` ``(hits, total, skipped)``; ``.recall`` = hits / total.
    """
    check_tensor("token_ids", token_ids, dims=2)
    if token_ids.dtype != torch.int64:
        raise TypeError(f"token_ids must be int64, got {token_ids.dtype}")
    check_bool_mask("attention_mask", attention_mask, token_ids.shape)
    check_bool_mask("candidate_mask", candidate_mask, token_ids.shape)
    if not isinstance(num_masked, int) or num_masked < 1:
        raise ValueError(f"num_masked must be an int >= 1, got {num_masked!r}")
    candidates = candidate_mask.to(token_ids.device) & attention_mask.to(token_ids.device)
    eligible = candidates.sum(1) >= num_masked  # [B]
    skipped = int((~eligible).sum())
    if not bool(eligible.any()):
        return MaskedWordRecall(hits=0, total=0, skipped=skipped)
    # Rows that cannot hold num_masked words get no candidates, so nothing is masked there.
    candidates = candidates & eligible[:, None]
    masked_ids, masked = mask_word_tokens(
        token_ids, candidates, mask_token_id if mask_token_id is not None else 0,
        generator=generator, count=num_masked)
    if mask_token_id is None:
        masked_ids = token_ids.clone()
    with torch.no_grad():
        logits = predict_fn(masked_ids, masked)
    check_tensor("predict_fn's logits", logits, dims=3)
    if logits.shape[:2] != token_ids.shape:
        raise ValueError(f"predict_fn must return logits [B, T, V] with [B, T] = "
                         f"{tuple(token_ids.shape)}, got {tuple(logits.shape)}")
    targets = token_ids[masked]
    if vocabulary is not None and vocabulary.numel() != logits.shape[2]:
        raise ValueError(f"vocabulary has {vocabulary.numel()} ids but predict_fn's logits have "
                         f"{logits.shape[2]} columns")
    if vocabulary is None and int(targets.max()) >= logits.shape[2]:
        raise ValueError(f"predict_fn's logits cover V={logits.shape[2]} ids but a masked token "
                         f"has id {int(targets.max())}: the vocabularies differ")
    predictions = logits[masked.to(logits.device)].argmax(-1)
    if vocabulary is not None:
        predictions = vocabulary.to(predictions.device)[predictions]
    predictions = predictions.to(targets.device)
    hits = int((predictions == targets).sum())
    return MaskedWordRecall(hits=hits, total=int(targets.numel()), skipped=skipped)


class MaskedWordRecallMeter:
    """Sums :class:`MaskedWordRecall` over batches; ``compute()`` gives the pooled totals."""

    def __init__(self):
        self.hits = 0
        self.total = 0
        self.skipped = 0

    def update(self, result: MaskedWordRecall) -> None:
        self.hits += int(result.hits)
        self.total += int(result.total)
        self.skipped += int(result.skipped)

    def compute(self) -> MaskedWordRecall:
        return MaskedWordRecall(self.hits, self.total, self.skipped)

    def reset(self) -> None:
        self.__init__()


# --------------------------------------------------------------------------------------------
# Word-to-code relation MSE

def relation_mse(word_features: Tensor, word_mask: Tensor, visual_tokens: Tensor,
                 codes_projected: Tensor, *, backend: str = "reference") -> float:
    """Word-to-code relation MSE of one batch of held-out pairs: the training relation loss
    (``lgvq_kernels.relation_alignment_loss``: mean over B·L·L of (P − Q)², P the Gram matrix of
    the codes aligned to each word, Q that of the words) evaluated without gradient.

    Args:
        word_features: float ``[B, L, C]`` text-token features T.
        word_mask: bool ``[B, L]``, real tokens.
        visual_tokens: float ``[B, M, C]`` Zvt without the CLS token.
        codes_projected: float ``[B, M, C]`` g(zq) (RelationAlignmentHead.project of the codes).
        backend: the op's backend ("reference" is deterministic and runs anywhere).

    Returns:
        The loss as a Python float (paper, CUB: VQ-GAN 0.6374, VQ-GAN+LG 0.0351).
    """
    with torch.no_grad():
        result = lgvq_kernels.relation_alignment_loss(
            word_features, visual_tokens, codes_projected, word_mask, backend=backend)
    return float(result.loss)


class RelationMSEMeter:
    """Mean of :func:`relation_mse` over batches, weighted by batch size (with a fixed text
    length L this is the mean over every sample's L×L relation matrix)."""

    def __init__(self, backend: str = "reference"):
        self.backend = backend
        self.weighted_sum = 0.0
        self.count = 0

    def update(self, word_features: Tensor, word_mask: Tensor, visual_tokens: Tensor,
               codes_projected: Tensor) -> float:
        """Adds one batch; returns its relation MSE."""
        value = relation_mse(word_features, word_mask, visual_tokens, codes_projected,
                             backend=self.backend)
        batch = word_features.shape[0]
        self.weighted_sum += value * batch
        self.count += batch
        return value

    def compute(self) -> float:
        if self.count == 0:
            raise ValueError("RelationMSEMeter.compute() called before any update()")
        return self.weighted_sum / self.count

    def reset(self) -> None:
        self.weighted_sum = 0.0
        self.count = 0


# --------------------------------------------------------------------------------------------
# Image→text retrieval

def retrieval_accuracy(image_embeddings: Tensor, text_embeddings: Tensor,
                       k: int | Sequence[int] = (1, 5), *, group_size: int | None = None,
                       chunk_size: int = 1024) -> dict[str, float]:
    """Image→text retrieval top-k accuracy (= Recall@k with one positive per image).

    Image i is scored against the texts of its group by cosine similarity; its own caption
    (text i) is the positive. Its rank is the number of other texts j != i of the group with
    similarity >= that of text i (exact ties count against the positive, so a collapsed
    embedding, every image alike, scores 0 rather than 1); a hit at k means rank < k. The
    group is all N texts (``group_size=None``: N-way retrieval), or the consecutive block of
    ``group_size`` pairs holding i (e.g. 8: the in-batch condition InfoNCE trains with; a last,
    shorter block is scored among its own members). Chance is about k / group size.

    Rows are processed ``chunk_size`` images at a time, so memory is ``chunk_size × N`` floats
    (N = 10,000: 40 MB per chunk of 1024 rows, instead of 400 MB for the N × N matrix).

    Args:
        image_embeddings: float ``[N, G]`` (e_CLS mapped to the global width).
        text_embeddings: float ``[N, G]`` (the caption's global feature, e.g. e_EOT).
        k: one int or several (each >= 1).
        group_size: texts each image is ranked among (None: all N).
        chunk_size: image rows per similarity block.

    Returns:
        ``{"top1": acc, "top5": acc, ...}``: fractions in [0, 1].
    """
    check_tensor("image_embeddings", image_embeddings, dims=2)
    check_tensor("text_embeddings", text_embeddings, dims=2)
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"image_embeddings {tuple(image_embeddings.shape)} and text_embeddings "
                         f"{tuple(text_embeddings.shape)} must both be [N, G]")
    count = image_embeddings.shape[0]
    if count == 0:
        raise ValueError("retrieval needs at least one pair (N = 0)")
    ks = (k,) if isinstance(k, int) else tuple(k)
    if not ks or any(not isinstance(value, int) or value < 1 for value in ks):
        raise ValueError(f"k must be an int >= 1 or a sequence of them, got {k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
    images = torch.nn.functional.normalize(image_embeddings.detach().float(), dim=-1)
    texts = torch.nn.functional.normalize(
        text_embeddings.detach().to(device=images.device, dtype=torch.float32), dim=-1)
    ranks = torch.empty(count, dtype=torch.int64, device=images.device)
    columns = torch.arange(count, device=images.device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        rows = torch.arange(start, stop, device=images.device)
        similarity = images[start:stop] @ texts.t()  # [rows, N]
        # The positive is read from the same product, so it is compared with itself exactly.
        positive = similarity[rows - start, rows]
        competing = similarity >= positive[:, None]
        if group_size is not None:  # only the texts of the row's own group compete
            competing &= (columns[None, :] // group_size) == (rows[:, None] // group_size)
        ranks[start:stop] = competing.sum(1) - 1  # minus the positive itself
    return {f"top{value}": float((ranks < value).double().mean()) for value in ks}

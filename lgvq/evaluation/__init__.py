"""Evaluation of VQ tokenizers and LG-VQ that needs no external weights (docs/method.md,
"Evaluation"): PSNR, codebook usage, masked-word Recall@1, word-to-code relation MSE,
image→text retrieval with e_CLS, and markdown / PNG reports.

Every measure takes tensors or a small callable and builds no model::

    meter = CodebookUsageMeter(codebook_size=1024)
    for batch in loader:
        meter.update(indices)                          # int64 [B, h, w]
    usage = meter.compute()                            # used_fraction, perplexity, counts
"""

from lgvq.evaluation.attributes import (
    AttributeFidelity,
    attribute_fidelity,
    judge_accuracy_on_real_renders,
)
from lgvq.evaluation.metrics import (
    PSNR_CAP_DB,
    CodebookUsageMeter,
    CodebookUsageStats,
    MaskedWordRecall,
    MaskedWordRecallMeter,
    RelationMSEMeter,
    codebook_usage,
    masked_word_recall,
    psnr,
    relation_mse,
    retrieval_accuracy,
)
from lgvq.evaluation.report import (
    MeanStd,
    format_cell,
    mean_and_std,
    save_image_grid,
    write_markdown_report,
)
from lgvq.evaluation.words import word_token_mask

__all__ = [
    "PSNR_CAP_DB",
    "AttributeFidelity",
    "CodebookUsageMeter",
    "CodebookUsageStats",
    "MaskedWordRecall",
    "MaskedWordRecallMeter",
    "MeanStd",
    "RelationMSEMeter",
    "attribute_fidelity",
    "codebook_usage",
    "format_cell",
    "judge_accuracy_on_real_renders",
    "masked_word_recall",
    "mean_and_std",
    "psnr",
    "relation_mse",
    "retrieval_accuracy",
    "save_image_grid",
    "word_token_mask",
    "write_markdown_report",
]

"""lgvq_kernels: fused kernels for vector quantization and LG-VQ.

Public ops live in :mod:`lgvq_kernels.functional` and are re-exported here. Each is a
``torch.library`` custom op served by one of the backends "reference", "native" or "triton"
(see :func:`available_backends`; the registry lives in ``lgvq_kernels._backends``).
"""

from lgvq_kernels._backends import (
    BACKENDS,
    OPS,
    BackendInfo,
    BackendUnavailableError,
    available_backends,
    resolve_backend,
    resolve_device,
)
from lgvq_kernels.functional import (
    NearestCode,
    Quantized,
    codebook_ema_update_,
    codebook_statistics,
    nearest_code,
    quantize_straight_through,
    relation_alignment_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "BackendUnavailableError",
    "OPS",
    "NearestCode",
    "Quantized",
    "codebook_ema_update_",
    "codebook_statistics",
    "available_backends",
    "nearest_code",
    "quantize_straight_through",
    "relation_alignment_loss",
    "resolve_backend",
    "resolve_device",
]

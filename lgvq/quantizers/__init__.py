"""Drop-in quantizer layers on lgvq's fused ops.

``VectorQuantizer`` (vector-quantize-pytorch's ``VectorQuantize`` surface), ``ResidualVQ``,
``ClusteredVectorQuantizer`` (CVQ-VAE's online clustered codebook) and
``TamingVectorQuantizer`` (taming-transformers' ``VectorQuantizer2`` interface). Every one
takes ``backend=`` and passes it to every op it calls. ``build_quantizer`` makes the one a
tokenizer uses from a kind ("ema", "learnable", "cvq") and its loss weights.
"""

from lgvq.quantizers.build import (
    QUANTIZER_KINDS,
    TAMING_LEGACY_WEIGHTS,
    TAMING_QUANTIZER_KWARGS,
    build_quantizer,
)
from lgvq.quantizers.clustered import ClusteredVectorQuantizer
from lgvq.quantizers.residual import ResidualVQ
from lgvq.quantizers.taming import TamingVectorQuantizer
from lgvq.quantizers.types import CodebookUsage, LossBreakdown
from lgvq.quantizers.peers import convert_vector_quantize_state_dict
from lgvq.quantizers.vector_quantizer import VectorQuantizer

__all__ = [
    "QUANTIZER_KINDS",
    "TAMING_LEGACY_WEIGHTS",
    "TAMING_QUANTIZER_KWARGS",
    "ClusteredVectorQuantizer",
    "CodebookUsage",
    "LossBreakdown",
    "ResidualVQ",
    "TamingVectorQuantizer",
    "VectorQuantizer",
    "build_quantizer",
    "convert_vector_quantize_state_dict",
]

"""Drop-in quantizer layers on lgvq's fused ops.

``VectorQuantizer`` (vector-quantize-pytorch's ``VectorQuantize`` surface), ``ResidualVQ``,
``ClusteredVectorQuantizer`` (CVQ-VAE's online clustered codebook) and
``TamingVectorQuantizer`` (taming-transformers' ``VectorQuantizer2`` interface). Every one
takes ``backend=`` and passes it to every op it calls.
"""

from lgvq.quantizers.clustered import ClusteredVectorQuantizer
from lgvq.quantizers.residual import ResidualVQ
from lgvq.quantizers.taming import TamingVectorQuantizer
from lgvq.quantizers.types import CodebookUsage, LossBreakdown
from lgvq.quantizers.vector_quantizer import VectorQuantizer

__all__ = [
    "ClusteredVectorQuantizer",
    "CodebookUsage",
    "LossBreakdown",
    "ResidualVQ",
    "TamingVectorQuantizer",
    "VectorQuantizer",
]

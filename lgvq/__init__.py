"""lgvq: drop-in fast vector quantizers and LG-VQ language-guided codebook learning."""

from lgvq.models.language_guided import LGVQ, LanguageLossWeights, LGVQOutput
from lgvq.quantizers import (
    ClusteredVectorQuantizer,
    CodebookUsage,
    LossBreakdown,
    ResidualVQ,
    TamingVectorQuantizer,
    VectorQuantizer,
)

__version__ = "0.1.0"

__all__ = [
    "ClusteredVectorQuantizer",
    "CodebookUsage",
    "LGVQ",
    "LGVQOutput",
    "LanguageLossWeights",
    "LossBreakdown",
    "ResidualVQ",
    "TamingVectorQuantizer",
    "VectorQuantizer",
]

"""lgvq: drop-in fast vector quantizers and LG-VQ language-guided codebook learning."""

__version__ = "0.1.0"

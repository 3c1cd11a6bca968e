"""Downstream models on a frozen tokenizer's codes (the paper's App. A.1, Tables 5-7 and 10).

``codes``: the shared layer (a frozen tokenizer from an ``lgvq train`` checkpoint, splits
encoded to code indices once and cached). The generation tasks build on it; so will the
understanding tasks (captioning, VQA, grounding).
"""

from lgvq.downstream.codes import (
    CodeSplit,
    FrozenTokenizer,
    encode_split,
    file_digest,
    load_tokenizer,
)

__all__ = ["CodeSplit", "FrozenTokenizer", "encode_split", "file_digest", "load_tokenizer"]

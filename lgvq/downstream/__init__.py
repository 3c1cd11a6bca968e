"""Downstream models on a frozen tokenizer's codes (the paper's App. A.1, Tables 5-11).

Modules:
  codes        the shared layer: a frozen tokenizer from an ``lgvq train`` checkpoint, data set
               splits encoded to code indices once (cached, keyed by checkpoint hash + data
               config), with captions and (captioned shapes) exact attributes; image files
               of the understanding folders are encoded and cached the same way.
  transformer  the code transformer (SDPA; codebook-initialised or learned code embeddings;
               prefix and cross-attention conditioning; KV cache)
  sampling     autoregressive (temperature, top-k, top-p, seeded, cached) and MaskGIT sampling
  tasks        every task's config, losses and the training loop (torchrun data parallel)
  understanding  caption, vqa, ground: exact questions and expressions on captioned shapes,
               COCO-QA/RefCOCO-style JSONL folders, the code-text model, beam search
  understanding_evaluation  their scores beside chance levels
  metrics      BLEU-4, ROUGE-L, METEOR, CIDEr-D (pycocoevalcap), VQA accuracy, box IoU
  evaluation   held-out loss, the exact attribute judge, completion PSNR, optional FID
  cli          ``lgvq downstream TASK --tokenizer=CKPT``
  demo         ``python -m lgvq.downstream.demo``: every task on baseline vs LG-VQ codes
"""

from lgvq.downstream.codes import (
    CodeSplit,
    FrozenTokenizer,
    encode_split,
    file_digest,
    load_tokenizer,
)

__all__ = ["CodeSplit", "FrozenTokenizer", "encode_split", "file_digest", "load_tokenizer"]

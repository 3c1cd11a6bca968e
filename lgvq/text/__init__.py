"""Frozen pre-trained text encoders for LG-VQ's language losses.

Every encoder is a ``TextEncoder`` (a frozen ``torch.nn.Module``) with one interface::

    encoder = load_text_encoder("minilm")          # or a local CLIP / BERT-like folder
    tokens = encoder.tokenize(captions)            # ids, attention_mask, special_mask [B, T]
    features = encoder.encode(captions)            # token [B, T, C], global [B, G], masks, ids
    masked_ids, masked = encoder.mask_tokens(tokens.ids, tokens.attention_mask,
                                             tokens.special_mask, ratio=0.15, generator=g)
    features = encoder.encode_ids(masked_ids, tokens.attention_mask, tokens.special_mask)
    encoder.token_embedding                        # [V, C] table for the tied masked-word head

``TextFeatureCache`` computes each distinct caption once and can persist to safetensors.
transformers is imported only when an encoder is constructed.
"""

from lgvq.text.cache import TextFeatureCache, TextFeatureCacheWarning, caption_set_fingerprint
from lgvq.text.encoder import DEFAULT_MAX_LENGTH, TextEncoder
from lgvq.text.masking import mask_word_tokens
from lgvq.text.features import TextFeatures, TokenizedText
from lgvq.text.huggingface import (
    MINILM_NAME,
    CLIPTextEncoder,
    MeanPoolingTextEncoder,
    MiniLMTextEncoder,
    load_text_encoder,
    minilm_model_directory,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MINILM_NAME",
    "CLIPTextEncoder",
    "MeanPoolingTextEncoder",
    "MiniLMTextEncoder",
    "TextEncoder",
    "TextFeatureCache",
    "TextFeatureCacheWarning",
    "TextFeatures",
    "TokenizedText",
    "caption_set_fingerprint",
    "load_text_encoder",
    "mask_word_tokens",
    "minilm_model_directory",
]

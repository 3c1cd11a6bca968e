"""Containers passed between the frozen text encoder and the language losses.

Shapes use B = number of captions, T = the encoder's ``max_length`` (every caption is padded
or truncated to exactly T tokens), C = the encoder's token width, G = its global width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenizedText", "TextFeatures"]


@dataclass
class TokenizedText:
    """Token ids of a batch of captions, padded and truncated to the encoder's ``max_length``.

    Attributes:
        ids: int64 ``[B, T]`` token ids; padding slots hold the tokenizer's pad id.
        attention_mask: bool ``[B, T]``; True on every real token, special tokens included
            (CLS/SEP for BERT-like encoders, BOS/EOS for CLIP); False on padding only.
        special_mask: bool ``[B, T]``; True on the special tokens the tokenizer added around the
            caption (CLS/SEP or BOS/EOS), False on words and on padding. Always a subset of
            ``attention_mask``.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor

    @property
    def word_mask(self) -> torch.Tensor:
        """bool ``[B, T]``: real tokens that are not special (the maskable words)."""
        return self.attention_mask & ~self.special_mask

    def to(self, device: torch.device | str) -> TokenizedText:
        """The same token ids on ``device``."""
        return TokenizedText(
            ids=self.ids.to(device),
            attention_mask=self.attention_mask.to(device),
            special_mask=self.special_mask.to(device),
        )

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class TextFeatures:
    """Output of a frozen text encoder for a batch of captions.

    Attributes:
        token_features: float32 ``[B, T, C]``; final hidden states of the encoder (for CLIP:
            after its final LayerNorm). Exactly zero at padding positions.
        global_features: float32 ``[B, G]``; one sentence vector per caption (mean pooling of
            the real tokens for BERT-like encoders, the projected EOT feature for CLIP). Not
            L2-normalised.
        attention_mask: bool ``[B, T]``; True on real tokens, special tokens included.
        special_mask: bool ``[B, T]``; True on the added special tokens (CLS/SEP, BOS/EOS).
        ids: int64 ``[B, T]``; the token ids that were encoded (masked ids if the caller masked
            them before encoding).
    """

    token_features: torch.Tensor
    global_features: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor
    ids: torch.Tensor

    @property
    def word_mask(self) -> torch.Tensor:
        """bool ``[B, T]``: real tokens that are not special."""
        return self.attention_mask & ~self.special_mask

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str) -> TextFeatures:
        """The same features on ``device``."""
        return TextFeatures(
            token_features=self.token_features.to(device),
            global_features=self.global_features.to(device),
            attention_mask=self.attention_mask.to(device),
            special_mask=self.special_mask.to(device),
            ids=self.ids.to(device),
        )

    def index_select(self, rows: torch.Tensor) -> TextFeatures:
        """The captions at ``rows`` (int64 ``[R]``), in that order."""
        rows = rows.to(self.ids.device)
        return TextFeatures(
            token_features=self.token_features.index_select(0, rows),
            global_features=self.global_features.index_select(0, rows),
            attention_mask=self.attention_mask.index_select(0, rows),
            special_mask=self.special_mask.index_select(0, rows),
            ids=self.ids.index_select(0, rows),
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

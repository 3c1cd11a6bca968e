"""lgvq.models.LGVQ: language-guided codebook learning around any VQ image tokenizer.

The wrapped model must provide ``encode(images) -> (z_e, zq_st, indices, vq_loss, info)`` with
the straight-through quantized map ``zq_st`` ``[B, D, h, w]`` and ``decode(zq) -> images``
(lgvq.models.VQModel does). LG-VQ adds three losses that read ``zq_st`` (docs/method.md):

    L = L_vq (+ reconstruction, GAN: the backbone's) + alpha L_gsa + beta L_mtp + gamma L_ras

With ``language_guidance=False`` the same heads are trained on ``zq_st.detach()``: the tokenizer
receives no language gradient (the plain baseline) while the heads become probes of its tokens
trained with the same budget, so both models are scored by one protocol.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lgvq.alignment import (
    MaskedTextDecoder,
    MaskedWordHead,
    RelationAlignmentHead,
    VisualTokenEncoder,
    global_semantic_alignment_loss,
    masked_word_loss,
)
from lgvq.text.features import TextFeatures


class LanguageLossWeights(NamedTuple):
    """The weights of the language losses; their values and defaults live in
    ``lgvq.config.TrainConfig`` (fields of the same names)."""

    alpha: float  # global semantic alignment (InfoNCE)
    beta: float  # masked text prediction
    gamma: float  # relationship alignment
    temperature: float  # InfoNCE temperature
    label_smoothing: float  # of the masked-word cross-entropy


class LanguageLosses(NamedTuple):
    total: Tensor  # alpha * gsa + beta * mtp + gamma * ras
    global_alignment: Tensor  # L_gsa
    masked_prediction: Tensor  # L_mtp
    relation: Tensor  # L_ras
    visual_tokens: Tensor  # Zvt [B, M + 1, C]


class LGVQOutput(NamedTuple):
    """What :meth:`LGVQ.forward` returns for a batch."""

    loss: Tensor  # vq_loss + language.total; add the tokenizer's reconstruction loss to it
    reconstruction: Tensor  # tokenizer.decode(zq_st), the images' shape
    vq_loss: Tensor  # the tokenizer's quantizer loss (from encode)
    language: LanguageLosses  # the weighted total and each LG-VQ loss
    indices: Tensor  # the code indices from encode


class LGVQ(nn.Module):
    """Language guidance heads around a VQ tokenizer.

    Args:
      tokenizer: the VQ model (see module docstring).
      code_dim: D, channels of zq_st. num_tokens: M = h * w.
      text_width: C (token features); global_width: G (sentence feature); max_length: T;
      token_embedding: the frozen encoder's ``[V, C_emb]`` table for the tied MLM head.
      weights: the loss weights (see LanguageLossWeights).
      language_guidance: False trains the heads as probes on detached tokens (baseline).
      backend: kernel backend for the relation op.
      visual_width: width of the visual-token encoder (None: code_dim, as in the paper).
      vocabulary: int64 ``[V']`` token ids the masked-word head scores (None: all V).
      decoder_width: width of the masked text decoder (None: C, as in the official code); a
        narrower decoder reads its context and Zvt through linear maps from C.
      decoder_heads: attention heads of the masked text decoder (1 in the official code).
      decoder_dropout: dropout of the masked text decoder's residual branches and feed-forward
        (0.1 in the official code).
      decoder_layers: layers of the masked text decoder (2 in the official code).
    """

    def __init__(self, tokenizer: nn.Module, *, code_dim: int, num_tokens: int, text_width: int,
                 global_width: int, max_length: int, token_embedding: Tensor,
                 weights: LanguageLossWeights, language_guidance: bool = True,
                 backend: str = "auto", visual_width: int | None = None,
                 vocabulary: Tensor | None = None, decoder_width: int | None = None,
                 decoder_heads: int = 1, decoder_dropout: float = 0.1,
                 decoder_layers: int = 2):
        super().__init__()
        self.tokenizer = tokenizer
        self.weights = weights
        self.language_guidance = language_guidance
        self.visual_encoder = VisualTokenEncoder(code_dim, num_tokens, text_width,
                                                 width=visual_width or None)
        self.cls_to_global = (nn.Identity() if global_width == text_width
                              else nn.Linear(text_width, global_width, bias=False))
        decoder_width = decoder_width or text_width
        # the official decoder works at the text width; a narrower one (the demo's) reads the
        # context and the visual tokens through linear maps, which at C=384 and 2 CPU cores
        # cuts the decoder's cost about (384/width)^2 times
        self.decoder_input = (nn.Identity() if decoder_width == text_width
                              else nn.Linear(text_width, decoder_width))
        self.decoder_memory = (nn.Identity() if decoder_width == text_width
                               else nn.Linear(text_width, decoder_width))
        self.text_decoder = MaskedTextDecoder(decoder_width, max_length, depth=decoder_layers,
                                              heads=decoder_heads, dropout=decoder_dropout)
        self.word_head = MaskedWordHead(decoder_width, token_embedding, vocabulary)
        # subtracted from the global text features before InfoNCE and retrieval; zero unless
        # set (centre_text_targets): captions that share most words have nearly parallel
        # sentence features, which centring spreads apart
        self.register_buffer("text_centre", torch.zeros(global_width))
        self.relation = RelationAlignmentHead(code_dim, text_width, backend=backend)

    def set_text_centre(self, centre: Tensor) -> None:
        """Centre of the global text features (e.g. their mean over the training captions)."""
        self.text_centre.copy_(centre.detach().reshape(self.text_centre.shape))

    def text_targets(self, global_features: Tensor) -> Tensor:
        """The global text features as InfoNCE and retrieval compare them (centred)."""
        return global_features - self.text_centre.to(global_features)

    def head_parameters(self):
        """Parameters of the language heads (not of the tokenizer)."""
        for name, parameter in self.named_parameters():
            if not name.startswith("tokenizer."):
                yield parameter

    def tokens(self, zq_st: Tensor) -> Tensor:
        """zq_st ``[B, D, h, w]`` → tokens ``[B, M, D]``; detached for the baseline."""
        tokens = zq_st.flatten(2).transpose(1, 2)
        return tokens if self.language_guidance else tokens.detach()

    def language_losses(self, zq_st: Tensor, text: TextFeatures, masked: Tensor,
                        context: Tensor | None = None) -> LanguageLosses:
        """The three LG-VQ losses for one batch.

        zq_st ``[B, D, h, w]``; text: features of ``k`` captions per image (unmasked),
        image-major (rows ``i k`` to ``i k + k - 1`` describe image ``i``; ``k = 1`` in the
        paper); masked bool ``[B k, T]``: the word slots to predict; context ``[B k, T, C]``:
        what the masked text decoder reads (``lgvq.training.masked_context``; None:
        ``text.token_features``, the paper's context, whose masked slots the decoder
        overwrites). The masked-word loss averages over every caption; global and relation
        alignment use each image's first caption (more captions of one image in the InfoNCE
        batch would be false negatives).
        """
        images, rows = zq_st.shape[0], len(text)
        first = text
        if rows != images:
            if images == 0 or rows % images:
                raise ValueError(f"text: expected a whole number of captions per image, got "
                                 f"{rows} captions for {images} images")
            first = text.index_select(torch.arange(0, rows, rows // images))
        tokens = self.tokens(zq_st)
        visual = self.visual_encoder(tokens)
        gsa = global_semantic_alignment_loss(self.cls_to_global(visual[:, 0]),
                                             self.text_targets(first.global_features),
                                             self.weights.temperature)
        context = text.token_features if context is None else context
        hidden = self.decode_text(context, masked, text.attention_mask, visual)
        mtp = masked_word_loss(self.word_head, hidden, text.ids, masked,
                               self.weights.label_smoothing)
        ras, _ = self.relation(first.token_features, first.attention_mask, visual[:, 1:], tokens)
        w = self.weights
        total = w.alpha * gsa + w.beta * mtp + w.gamma * ras
        return LanguageLosses(total, gsa, mtp, ras, visual)

    def forward(self, images: Tensor, text: TextFeatures, masked: Tensor,
                context: Tensor | None = None) -> LGVQOutput:
        """One batch through the tokenizer and the language heads.

        images: what ``tokenizer.encode`` takes (``[B, 3, H, W]``); text: the features of one
        caption per image (``TextEncoder.encode``); masked bool ``[B, T]``: the word slots the
        masked-text head predicts (``TextEncoder.mask_tokens``); context: as for
        :meth:`language_losses`. Returns :class:`LGVQOutput`; train on ``output.loss`` plus
        your reconstruction loss of ``output.reconstruction`` (and a GAN term, if any).
        """
        _, zq_st, indices, vq_loss, _ = self.tokenizer.encode(images)
        reconstruction = self.tokenizer.decode(zq_st)
        language = self.language_losses(zq_st, text, masked, context)
        return LGVQOutput(vq_loss + language.total, reconstruction, vq_loss, language, indices)

    def decode_text(self, context: Tensor, masked: Tensor, attention_mask: Tensor,
                    visual: Tensor) -> Tensor:
        """The masked text decoder's hidden states ``[B k, T, decoder width]`` at the masked
        slots (zeros elsewhere: the last layer runs only where the word head reads) for a
        context ``[B k, T, C]`` (``k`` captions per image, image-major) and the visual tokens
        Zvt ``[B, M + 1, C]``."""
        return self.text_decoder(self.decoder_input(context), masked, attention_mask,
                                 self.decoder_memory(visual), only_masked=True)

    def predict_masked_words(self, zq_st: Tensor, context: Tensor, masked: Tensor,
                             attention_mask: Tensor) -> Tensor:
        """Logits ``[B, T, V']`` of the masked-word head at the masked slots (evaluation), over
        the head's vocabulary (``word_head.vocabulary`` maps an index to its token id); other
        slots hold zeros (the vocabulary projection runs only where a word is predicted)."""
        visual = self.visual_encoder(zq_st.flatten(2).transpose(1, 2))
        hidden = self.decode_text(context, masked, attention_mask, visual)
        logits = hidden.new_zeros(*hidden.shape[:2], self.word_head.bias.shape[0])
        logits[masked] = self.word_head(hidden[masked])
        return logits

    def image_embedding(self, zq_st: Tensor) -> Tensor:
        """e_CLS mapped to the global text width ``[B, G]`` (retrieval)."""
        visual = self.visual_encoder(zq_st.flatten(2).transpose(1, 2))
        return self.cls_to_global(visual[:, 0])

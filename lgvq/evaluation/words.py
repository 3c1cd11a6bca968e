"""Which tokens of a tokenized caption are, on their own, a whole word of a given set (e.g. the
attribute words of captioned shapes that masked-word recall masks), for any tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from lgvq.evaluation.checks import check_bool_mask, check_tensor

__all__ = ["word_token_mask"]


def word_token_mask(
    token_ids: Tensor,
    attention_mask: Tensor,
    words: Collection[str],
    *,
    token_strings: Sequence[str] | None = None,
    decode_token: Callable[[int], str] | None = None,
    special_mask: Tensor | None = None,
    continuation_prefix: str | None = "##",
    end_of_word_suffix: str | None = None,
) -> Tensor:
    """bool ``[B, T]``: the tokens that are, on their own, a whole word from ``words``.

    Tokenizer-agnostic: give the text of each token id either as ``token_strings`` (indexed by
    id, e.g. ``tokenizer.convert_ids_to_tokens(range(V))``) or as ``decode_token(id) -> str``
    (called once per distinct id). A token matches when its text, with ``continuation_prefix``
    / ``end_of_word_suffix`` markers removed, stripped and lower-cased, is in ``words``
    (compared lower-cased), and it is a whole word:

    - ``continuation_prefix`` (WordPiece: "##"): a token starting with it continues the previous
      word, so neither it nor a token followed by it is a whole word ("red" "##dish" → no match).
    - ``end_of_word_suffix`` (CLIP BPE: "</w>"): only a token ending with it ends a word, and a
      token after one that does not end a word continues it ("bo" "red</w>" → no match). Needs
      ``special_mask``, so that the word after BOS counts as starting a word.

    Words split into several tokens are never matched (whole-word tokens only).

    Args:
        token_ids: int64 ``[B, T]``.
        attention_mask: bool ``[B, T]``, True on real tokens; padding never matches.
        words: the word set (e.g. ``lgvq.data.shapes.ALL_ATTRIBUTE_WORDS``).
        token_strings / decode_token: exactly one of them.
        special_mask: optional bool ``[B, T]``; special tokens (CLS/SEP, BOS/EOS) never match.
        continuation_prefix, end_of_word_suffix: the tokenizer's word-piece markers (None: none).
    """
    check_tensor("token_ids", token_ids, dims=2)
    check_bool_mask("attention_mask", attention_mask, token_ids.shape)
    if special_mask is not None:
        check_bool_mask("special_mask", special_mask, token_ids.shape)
    if end_of_word_suffix and special_mask is None:
        raise ValueError("end_of_word_suffix needs special_mask (BOS/EOS mark word boundaries)")
    if (token_strings is None) == (decode_token is None):
        raise ValueError("give exactly one of token_strings (text per id) and decode_token")
    if isinstance(words, str):
        raise TypeError("words must be a collection of words, not one str")
    word_set = {word.lower() for word in words}
    ids_cpu = token_ids.detach().cpu()
    distinct = torch.unique(ids_cpu).tolist()
    if token_strings is not None and distinct and (min(distinct) < 0
                                                   or max(distinct) >= len(token_strings)):
        raise ValueError(f"token_ids must lie in [0, {len(token_strings)}) to index "
                         f"token_strings, got [{min(distinct)}, {max(distinct)}]")
    text_of = token_strings.__getitem__ if token_strings is not None else decode_token

    matches, continues, ends = set(), set(), set()
    for token in distinct:
        text = text_of(int(token))
        if not isinstance(text, str):
            raise TypeError(f"the text of token {token} must be a str, got {type(text).__name__}")
        core = text
        if continuation_prefix and core.startswith(continuation_prefix):
            continues.add(token)
            core = core[len(continuation_prefix):]
        if end_of_word_suffix and core.endswith(end_of_word_suffix):
            ends.add(token)
            core = core[: -len(end_of_word_suffix)]
        if core.strip().lower() in word_set:
            matches.add(token)

    def lookup(members: set) -> Tensor:
        return torch.tensor([token in members for token in distinct], dtype=torch.bool)

    position = torch.searchsorted(torch.tensor(distinct, dtype=ids_cpu.dtype), ids_cpu)
    real = attention_mask.detach().cpu()
    if special_mask is not None:
        real = real & ~special_mask.detach().cpu()
    result = lookup(matches)[position] & real
    if continuation_prefix:
        continuation = lookup(continues)[position] & real
        followed = torch.zeros_like(continuation)
        followed[:, :-1] = continuation[:, 1:]
        result &= ~continuation & ~followed
    if end_of_word_suffix:
        ends_word = lookup(ends)[position]
        # A word starts after a token that ends one, after a special token (BOS) or at row start.
        previous_ends = torch.ones_like(ends_word)
        previous_ends[:, 1:] = ends_word[:, :-1] | ~real[:, :-1]
        result &= ends_word & previous_ends
    return result.to(token_ids.device)

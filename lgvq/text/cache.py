"""Cache of frozen-encoder features per caption, in memory and optionally in a safetensors file.

The encoder is frozen, so a caption's features never change: encode every caption of a data
set once and assemble training batches from stored rows. Memory per caption is
``T * (4 C + 10) + 4 G`` bytes: about 46 KB for MiniLM at T=30, 62 KB for CLIP ViT-B/32.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lgvq.files import atomic_path
from lgvq.text.encoder import DEFAULT_BATCH_SIZE, TextEncoder, _check_captions
from lgvq.text.features import TextFeatures

__all__ = ["TextFeatureCache", "TextFeatureCacheWarning", "caption_set_fingerprint"]

_FORMAT = "lgvq.text_feature_cache.v1"
_FIELDS = ("token_features", "global_features", "attention_mask", "special_mask", "ids")


class TextFeatureCacheWarning(UserWarning):
    """A cache file was ignored (other encoder or captions, or unreadable) and will be rebuilt."""


def caption_set_fingerprint(encoder: TextEncoder, captions: Sequence[str]) -> str:
    """Hex digest of (encoder identity, max_length, the ordered caption list)."""
    captions_digest = hashlib.sha256(
        json.dumps(list(captions), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    key = {
        "format": _FORMAT,
        "encoder": encoder.fingerprint,
        "encoder_name": encoder.name,
        "max_length": encoder.max_length,
        "captions": captions_digest,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _unique_in_order(captions: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(captions))


class TextFeatureCache:
    """Features of a frozen text encoder, computed once per distinct caption.

    ``encode(captions)`` returns the same TextFeatures as ``encoder.encode(captions)`` (bitwise
    when the missing captions are the same list; otherwise within float rounding, about 1e-6,
    see ``TextEncoder.encode_ids``), encoding only captions not seen before, in batches of
    ``batch_size``. Rows are kept on the CPU; results go to ``device`` (default: the encoder's).

    File persistence (safetensors): ``save(path)`` writes all rows with a fingerprint of the
    encoder (model, weights, tokenizer, max_length) and of the caption list; ``load(path)``
    ignores, with a ``TextFeatureCacheWarning``, a file made by another encoder or for other
    captions, and an unreadable one. Writes are atomic (lgvq.files), so a good file is never
    replaced by a partial one.

    Typical use for a fixed caption set::

        cache = TextFeatureCache.build(encoder, all_captions, path="cache/text_minilm.safetensors")
        features = cache.encode(batch_captions)   # all hits: no forward pass

    Args:
        encoder: the frozen text encoder.
        batch_size: captions per forward pass for captions not yet cached.
    """

    def __init__(self, encoder: TextEncoder, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if not isinstance(encoder, TextEncoder):
            raise TypeError(
                f"encoder must be a lgvq.text.TextEncoder, got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.batch_size = batch_size
        self._row_of: dict[str, int] = {}
        self._captions: list[str] = []
        self._banks: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------- in memory
    def __len__(self) -> int:
        return len(self._captions)

    def __contains__(self, caption: object) -> bool:
        return caption in self._row_of

    @property
    def captions(self) -> list[str]:
        """The cached captions, in row order."""
        return list(self._captions)

    def add(self, captions: Sequence[str]) -> int:
        """Encode and store the captions not cached yet; returns how many were new."""
        captions = _check_captions(captions)
        missing = [c for c in _unique_in_order(captions) if c not in self._row_of]
        if missing:
            self._append(missing, self.encoder.encode(missing, batch_size=self.batch_size))
        return len(missing)

    def encode(
        self, captions: Sequence[str], *, device: torch.device | str | None = None
    ) -> TextFeatures:
        """Features of ``captions`` (list of B strings), encoding only the uncached ones.

        Returns:
            TextFeatures as ``TextEncoder.encode``: token_features float32 ``[B, T, C]``,
            global_features float32 ``[B, G]``, masks bool ``[B, T]``, ids int64 ``[B, T]``,
            on ``device`` (default: the encoder's device).
        """
        captions = _check_captions(captions)
        self.add(captions)
        rows = torch.tensor([self._row_of[c] for c in captions], dtype=torch.int64)
        selected = self._view().index_select(rows)
        return selected.to(device if device is not None else self.encoder.device)

    def fingerprint(self) -> str:
        """Fingerprint of the current contents (encoder identity + cached captions in order)."""
        return caption_set_fingerprint(self.encoder, self._captions)

    def _view(self) -> TextFeatures:
        count = len(self._captions)
        if not self._banks:
            length, width = self.encoder.max_length, self.encoder.width
            empty = torch.zeros(0, length, dtype=torch.bool)
            return TextFeatures(
                torch.zeros(0, length, width), torch.zeros(0, self.encoder.global_dim),
                empty, empty.clone(), torch.zeros(0, length, dtype=torch.int64),
            )
        return TextFeatures(**{name: self._banks[name][:count] for name in _FIELDS})

    def _append(self, captions: list[str], features: TextFeatures) -> None:
        """Store rows; banks grow by doubling, so appending is amortised O(rows added)."""
        features = features.to("cpu")
        start, added = len(self._captions), len(captions)
        needed = start + added
        for name in _FIELDS:
            rows = getattr(features, name)
            bank = self._banks.get(name)
            if bank is None or bank.shape[0] < needed:
                capacity = max(needed, 2 * (bank.shape[0] if bank is not None else 0), 16)
                grown = torch.zeros((capacity, *rows.shape[1:]), dtype=rows.dtype)
                if bank is not None:
                    grown[:start] = bank[:start]
                self._banks[name] = bank = grown
            bank[start:needed] = rows
        for offset, caption in enumerate(captions):
            self._row_of[caption] = start + offset
        self._captions.extend(captions)

    # -------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write every cached row to ``path`` (safetensors), atomically."""
        view = self._view()
        tensors = {name: getattr(view, name).contiguous() for name in _FIELDS}
        captions_json = json.dumps(self._captions, ensure_ascii=False).encode("utf-8")
        tensors["captions_utf8"] = torch.frombuffer(bytearray(captions_json), dtype=torch.uint8)
        metadata = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint(),
            "encoder_fingerprint": self.encoder.fingerprint,
            "encoder_name": self.encoder.name,
            "max_length": str(self.encoder.max_length),
            "num_captions": str(len(self._captions)),
        }
        with atomic_path(path) as temporary:
            save_file(tensors, temporary, metadata=metadata)

    def load(self, path: str | os.PathLike, captions: Sequence[str] | None = None) -> bool:
        """Add the rows stored in ``path``; returns whether the file was used.

        Args:
            path: a file written by ``save``.
            captions: if given, the file is used only if it was written for exactly this caption
                list (duplicates dropped, order kept), as ``build`` does.

        A missing file returns False silently. A file from another encoder (or another
        max_length), for other captions, or unreadable, returns False with a
        ``TextFeatureCacheWarning``; the cache is left unchanged.
        """
        path = Path(path)
        if not path.is_file():
            return False
        wanted = None
        if captions is not None:
            wanted = caption_set_fingerprint(
                self.encoder, _unique_in_order(_check_captions(captions))
            )
        try:
            metadata = self._read_metadata(path)
            same_encoder = metadata.get("encoder_fingerprint") == self.encoder.fingerprint
            same_captions = wanted is None or metadata.get("fingerprint") == wanted
            stored = self._read_rows(path, metadata) if same_encoder and same_captions else None
        except Exception as error:  # any unreadable or inconsistent file is rebuilt
            warnings.warn(
                f"ignoring corrupt text-feature cache {str(path)!r} ({type(error).__name__}: "
                f"{error}); it will be rebuilt",
                TextFeatureCacheWarning,
                stacklevel=2,
            )
            return False
        if not same_encoder:
            warnings.warn(
                f"ignoring text-feature cache {str(path)!r}: made by encoder "
                f"{metadata.get('encoder_name')!r} with max_length={metadata.get('max_length')} "
                f"and other weights/config than {self.encoder.name!r} with "
                f"max_length={self.encoder.max_length} (fingerprint mismatch); it will be rebuilt",
                TextFeatureCacheWarning,
                stacklevel=2,
            )
            return False
        if not same_captions:
            warnings.warn(
                f"ignoring text-feature cache {str(path)!r}: it holds another caption set "
                f"({metadata.get('num_captions')} captions; fingerprint mismatch); "
                "it will be rebuilt",
                TextFeatureCacheWarning,
                stacklevel=2,
            )
            return False
        stored_captions, features = stored
        new_rows = [i for i, c in enumerate(stored_captions) if c not in self._row_of]
        if new_rows:
            rows = torch.tensor(new_rows, dtype=torch.int64)
            self._append([stored_captions[i] for i in new_rows], features.index_select(rows))
        return True

    @staticmethod
    def _read_metadata(path: Path) -> dict[str, str]:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, expected {_FORMAT!r}")
        return metadata

    def _read_rows(self, path: Path, metadata: dict[str, str]) -> tuple[list[str], TextFeatures]:
        """The stored captions and rows, checked against this encoder and the fingerprint."""
        with safe_open(str(path), framework="pt", device="cpu") as file:
            tensors = {name: file.get_tensor(name) for name in (*_FIELDS, "captions_utf8")}
        captions = json.loads(bytes(tensors.pop("captions_utf8").numpy()).decode("utf-8"))
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError("stored captions are not a list of str")
        if len(set(captions)) != len(captions):
            raise ValueError("stored captions repeat")
        if caption_set_fingerprint(self.encoder, captions) != metadata.get("fingerprint"):
            raise ValueError("stored captions do not match the stored fingerprint")
        count, length = len(captions), self.encoder.max_length
        expected_shapes = {
            "token_features": ((count, length, self.encoder.width), torch.float32),
            "global_features": ((count, self.encoder.global_dim), torch.float32),
            "attention_mask": ((count, length), torch.bool),
            "special_mask": ((count, length), torch.bool),
            "ids": ((count, length), torch.int64),
        }
        for name, (shape, dtype) in expected_shapes.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                    f"expected {shape} and {dtype}"
                )
        return captions, TextFeatures(**tensors)

    @classmethod
    def build(
        cls,
        encoder: TextEncoder,
        captions: Sequence[str],
        path: str | os.PathLike | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> TextFeatureCache:
        """A cache holding ``captions``: read from ``path`` when it was written for this encoder
        and exactly these captions, else encoded now (and written to ``path`` if given)."""
        cache = cls(encoder, batch_size=batch_size)
        if path is not None and cache.load(path, captions):
            return cache
        cache.add(captions)
        if path is not None:
            cache.save(path)
        return cache


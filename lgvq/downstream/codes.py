"""The shared code-sequence layer of the downstream models: a frozen tokenizer read from an
``lgvq train`` checkpoint, and data set splits encoded to code indices once, cached on disk.

Generation (unconditional, completion, text-to-image, semantic synthesis) and understanding
(captioning, VQA, grounding) read the same thing: per image an int64 grid of code indices
``[h, w]``, its captions and, on captioned shapes, its exact ``SceneAttributes``. Encoding the
images is the only place the tokenizer runs forward; the cache file is keyed by the checkpoint's
content hash and the data config, so another checkpoint (or another split, size or image size)
never reads stale codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata
from lgvq.config import TrainConfig
from lgvq.data import SceneAttributes, ShapeObject, SpatialRelation
from lgvq.files import atomic_path
from lgvq.text import load_text_encoder
from lgvq.training import build_dataset, build_model

CACHE_FORMAT = "lgvq-codes-1"


@dataclass
class FrozenTokenizer:
    """A tokenizer of an ``lgvq train`` checkpoint, frozen (eval mode, no gradients).

    Attributes:
        model: the ``VQModel`` (``encode_to_indices``, ``decode_indices``).
        config: the checkpoint's ``TrainConfig`` (data set, image size, codebook).
        digest: sha256 of the checkpoint file: the identity of the codes it makes.
        path: the checkpoint file.
        text_encoder: the frozen text encoder the checkpoint trained with (the one text
            conditioning reads).
    """

    model: torch.nn.Module
    config: TrainConfig
    digest: str
    path: Path
    text_encoder: torch.nn.Module

    @property
    def codebook_size(self) -> int:
        return int(self.config.codebook_size)

    @property
    def grid(self) -> int:
        """Codes per side: image_size / 2 ** (levels - 1)."""
        return self.config.image_size // 2 ** (len(self.config.channel_multipliers) - 1)

    @torch.no_grad()
    def codebook(self) -> torch.Tensor:
        """float32 ``[K, D]``: what the decoder reads for each code index (the quantizer's
        ``get_output_from_indices``, so projections and layouts of any quantizer are included)."""
        device = next(self.model.parameters()).device
        indices = torch.arange(self.codebook_size, device=device).reshape(1, -1)
        return self.model.quantizer.get_output_from_indices(indices).reshape(
            self.codebook_size, -1).float().cpu()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Code grids int64 ``[B, h, w]`` -> images float ``[B, 3, H, W]`` clamped to [-1, 1]."""
        device = next(self.model.parameters()).device
        parts = [self.model.decode_indices(indices[i:i + batch_size].to(device)).float().cpu()
                 for i in range(0, len(indices), batch_size)]
        return torch.cat(parts).clamp(-1, 1)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   text_encoder=None) -> FrozenTokenizer:
    """Read the tokenizer of an ``lgvq train`` checkpoint (``lgvq.training.build_model`` +
    ``lgvq.checkpoint.load_checkpoint``), frozen on ``device``.

    Raises FileNotFoundError (missing file) or ValueError (not a readable lgvq checkpoint, or
    weights that do not fit its own config), each with a one-line message naming ``--tokenizer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer: checkpoint not found: {path} (train one with "
                                "`lgvq train --out_dir=...`)")
    try:
        meta = read_checkpoint_metadata(path)
        config = TrainConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"--tokenizer: {path} is not an lgvq train checkpoint: "
                         f"{str(error).splitlines()[0]}") from None
    text_encoder = text_encoder or load_text_encoder(config.text_encoder,
                                                     max_length=config.max_text_length)
    model = build_model(config, text_encoder)
    try:
        load_checkpoint(path, model=model, restore_rng=False)
    except (RuntimeError, SafetensorError, KeyError) as error:
        raise ValueError(f"--tokenizer: {path} does not load into the model its config "
                         f"describes: {str(error).splitlines()[0]}") from None
    tokenizer = model.tokenizer.to(device).eval().requires_grad_(False)
    return FrozenTokenizer(tokenizer, config, file_digest(path), path,
                           text_encoder.to(device).eval())


# ----------------------------------------------------------------------------------------------
# encoded splits
# ----------------------------------------------------------------------------------------------


@dataclass
class CodeSplit:
    """One data set split as code indices.

    Attributes:
        codes: int64 ``[N, h, w]`` code indices in [0, K).
        captions: N lists of captions.
        attributes: N ``SceneAttributes`` (captioned shapes) or None (other data sets).
        codebook_size: K.
        key: the cache key (checkpoint digest + data config) these codes were made under.
    """

    codes: torch.Tensor
    captions: list[list[str]]
    attributes: list[SceneAttributes] | None
    codebook_size: int
    key: str

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2])

    def sequences(self) -> torch.Tensor:
        """int64 ``[N, h * w]``: the grids in raster order (the order the transformer reads)."""
        return self.codes.reshape(len(self), -1)


def scene_to_dict(scene: SceneAttributes) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(values: dict) -> SceneAttributes:
    return SceneAttributes(objects=tuple(ShapeObject(**o) for o in values["objects"]),
                           relations=tuple(SpatialRelation(**r) for r in values["relations"]),
                           background_rgb=tuple(values["background_rgb"]))


def data_key(tokenizer: FrozenTokenizer, split: str, images: int) -> dict:
    """What the codes of a split depend on besides the network: the checkpoint and the data."""
    config = tokenizer.config
    return {"format": CACHE_FORMAT, "checkpoint": tokenizer.digest, "dataset": config.dataset,
            "data_root": str(Path(config.data_root).resolve()) if config.data_root else "",
            "image_size": config.image_size, "split": split, "images": images}


def split_dataset(tokenizer: FrozenTokenizer, split: str, images: int):
    config = dataclasses.replace(tokenizer.config, train_images=images, eval_images=images)
    try:
        return build_dataset(config, split)
    except ValueError as error:
        raise ValueError(f"split {split!r} of {config.dataset}: {error}") from None


@torch.no_grad()
def encode_split(tokenizer: FrozenTokenizer, split: str, images: int, cache_dir: str | None,
                 *, batch_size: int = 64) -> CodeSplit:
    """The codes of ``split`` (``images`` items; 0 = the whole folder set), read from the cache
    in ``cache_dir`` when it was written under the same key, else encoded now and written there
    atomically (``cache_dir`` empty or None: no cache)."""
    if not isinstance(images, int) or images < 0:
        raise ValueError(f"images must be a non-negative int, got {images!r}")
    path, key_text, cached = _look_up(data_key(tokenizer, split, images), cache_dir, split)
    if cached is not None:
        return cached
    dataset = split_dataset(tokenizer, split, images)
    result = _encode_items(tokenizer, dataset, key_text, batch_size)
    scenes = result.attributes
    if scenes is not None and not all(isinstance(a, SceneAttributes) for a in scenes):
        result.attributes = None
    if path is not None:
        _write_cache(path, result)
    return result


def _encode_items(tokenizer: FrozenTokenizer, dataset, key_text: str,
                  batch_size: int) -> CodeSplit:
    """Every item of ``dataset`` through the tokenizer, in order (an item served in place of an
    unreadable one is an error: the codes must be those of the listed images)."""
    device = next(tokenizer.model.parameters()).device
    codes, captions, attributes = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        for offset, item in enumerate(items):
            if item.get("index", start + offset) != start + offset:
                raise ValueError(f"{dataset}: item {start + offset} could not be read: "
                                 f"{dataset.skipped_paths[-1]}")
        batch = torch.stack([item["image"] for item in items]).to(device)
        codes.append(tokenizer.model.encode_to_indices(batch).cpu())
        captions.extend(list(item["captions"]) for item in items)
        attributes.extend(item["attributes"] for item in items)
    return CodeSplit(torch.cat(codes).long(), captions, attributes, tokenizer.codebook_size,
                     key_text)


@torch.no_grad()
def encode_image_files(tokenizer: FrozenTokenizer, paths: list[str], cache_dir: str | None,
                       what: str, *, batch_size: int = 64) -> torch.Tensor:
    """int64 ``[N, h, w]``: the codes of image files (resized and centre-cropped as the
    folder data sets do), cached like ``encode_split`` under a key of the checkpoint and every
    file's path, size and modification time. ``what`` names the option in errors."""
    from lgvq.data.folders import CaptionedImageEntry, CaptionedImageFolderDataset

    stamps = []
    for name in paths:
        if not Path(name).is_file():
            raise FileNotFoundError(f"--{what}: image {name} not found")
        stat = Path(name).stat()
        stamps.append([str(Path(name).resolve()), stat.st_size, stat.st_mtime_ns])
    key = {"format": CACHE_FORMAT, "checkpoint": tokenizer.digest, "files": stamps,
           "image_size": tokenizer.config.image_size}
    path, key_text, cached = _look_up(key, cache_dir, "files")
    if cached is not None:
        return cached.codes
    entries = [CaptionedImageEntry(Path(name), ("",)) for name in paths]
    dataset = CaptionedImageFolderDataset(entries, tokenizer.config.image_size, f"--{what}")
    result = _encode_items(tokenizer, dataset, key_text, batch_size)
    result.attributes = None
    if path is not None:
        _write_cache(path, result)
    return result.codes


def _look_up(key: dict, cache_dir, name: str) -> tuple[Path | None, str, CodeSplit | None]:
    """(cache file, key text, the cached codes or None) for ``key``: the file is named by a hash
    of the key and read only when it was written under the same key (``cache_dir`` empty: no
    cache)."""
    key_text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"codes-{name}-{digest}.safetensors" if cache_dir else None
    cached = _read_cache(path, key_text) if path is not None and path.is_file() else None
    return path, key_text, cached


def _write_cache(path: Path, split: CodeSplit) -> None:
    metadata = {"key": split.key, "captions": json.dumps(split.captions),
                "codebook_size": str(split.codebook_size),
                "attributes": json.dumps(None if split.attributes is None
                                         else [scene_to_dict(s) for s in split.attributes])}
    with atomic_path(path) as temporary:
        save_file({"codes": split.codes.contiguous()}, temporary, metadata=metadata)


def _read_cache(path: Path, key_text: str) -> CodeSplit | None:
    """The cached split, or None when the file is unreadable or was written under another key
    (it is then rewritten)."""
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
            if metadata.get("key") != key_text:
                return None
            codes = stream.get_tensor("codes")
    except (SafetensorError, OSError):
        return None
    attributes = json.loads(metadata["attributes"])
    return CodeSplit(codes.long(), json.loads(metadata["captions"]),
                     None if attributes is None else [scene_from_dict(a) for a in attributes],
                     int(metadata["codebook_size"]), key_text)


__all__ = ["CodeSplit", "FrozenTokenizer", "encode_image_files", "encode_split", "file_digest", "load_tokenizer",
           "scene_from_dict", "scene_to_dict"]

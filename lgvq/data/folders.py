"""Captioned real images read from local folders: JSONL manifest, CUB-200, MS-COCO, MM-CelebA-HQ.

Every data set here yields the same item as ``ShapesDataset``:
    "image": float32 [3, image_size, image_size] in [-1, 1] (shorter side resized with bicubic
             filtering, then centre-cropped),
    "captions": list[str] (non-empty, stripped),
    "attributes": None,
    "index": int, the index of the entry actually served (see below).

Bad data never stops an epoch. Entries without captions (or malformed manifest lines) are
dropped when the data set is built. An image that is missing or cannot be decoded is found
lazily, in ``__getitem__``: the entry is marked bad and the next good entry is served instead
(so a batch may hold a neighbour twice). ``dataset.skipped`` counts all dropped entries,
``dataset.skipped_paths`` lists them and ``dataset.skip_reasons`` says why; a warning
summarises them at build time and after the 1st, 2nd, 4th, 8th, ... bad image. With DataLoader
workers each worker keeps its own lazy count; call ``validate()`` first to check every file in
the main process. A missing root, folder or manifest raises FileNotFoundError naming the path
and the expected layout.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from lgvq.data.images import image_array_to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_image_tensor(path: str | Path, image_size: int) -> torch.Tensor:
    """Read an image file. Returns float32 [3, image_size, image_size] in [-1, 1].

    Any mode is converted to RGB; the shorter side is resized to ``image_size`` (bicubic) and the
    centre square kept. Raises whatever Pillow raises for a missing or corrupt file.
    """
    with Image.open(path) as image:
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, >= size
        rgb = image.convert("RGB")
    square = ImageOps.fit(rgb, (image_size, image_size), method=Image.Resampling.BICUBIC)
    return image_array_to_tensor(np.asarray(square))


def clean_captions(captions) -> list[str]:
    """Stripped, non-empty captions from a list of strings (non-strings are dropped)."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        return []
    return [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]


def read_caption_file(path: Path) -> list[str]:
    """One caption per line; blank lines dropped. A missing or unreadable file gives []."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return clean_captions(text.splitlines())


def _require_directory(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist or is not a folder")


def _natural_key(path: Path):
    # "2.jpg" before "10.jpg"; non-numeric names after numeric ones, alphabetically.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


@dataclasses.dataclass(frozen=True)
class CaptionedImageEntry:
    image_path: Path
    captions: tuple[str, ...]


class CaptionedImageFolderDataset(Dataset):
    """Base class: a list of (image path, captions) entries, loaded lazily and skip-tolerant.

    Subclasses build the entries; this class loads images, skips bad ones and keeps the count.
    ``skipped_at_build`` lists (path or description, reason) for entries already dropped.
    """

    def __init__(
        self,
        entries: list[CaptionedImageEntry],
        image_size: int,
        description: str,
        skipped_at_build: list[tuple[str, str]] | None = None,
    ):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.entries = entries
        self.image_size = image_size
        self.description = description
        self.skip_reasons: dict[str, str] = {}
        self._bad_indices: set[int] = set()
        self._next_warning_at = 1
        for path, reason in skipped_at_build or []:
            self.skip_reasons[path] = reason
        if not entries:
            raise ValueError(
                f"{description}: no usable entries ({self.skipped} skipped{self._examples()})"
            )
        if self.skipped:
            warnings.warn(
                f"{description}: skipped {self.skipped} entries while building "
                f"(kept {len(entries)}){self._examples()}; see dataset.skip_reasons",
                stacklevel=3,
            )

    @property
    def skipped(self) -> int:
        """Number of entries dropped so far (at build time and bad images found while loading)."""
        return len(self.skip_reasons)

    @property
    def skipped_paths(self) -> list[str]:
        return list(self.skip_reasons)

    def _examples(self, limit: int = 3) -> str:
        if not self.skip_reasons:
            return ""
        shown = list(self.skip_reasons.items())[:limit]
        return "; e.g. " + "; ".join(f"{path}: {reason}" for path, reason in shown)

    def _mark_bad(self, index: int, reason: str) -> None:
        self._bad_indices.add(index)
        path = str(self.entries[index].image_path)
        self.skip_reasons[path] = reason
        if self.skipped >= self._next_warning_at:
            self._next_warning_at *= 2
            warnings.warn(
                f"{self.description}: skipped unreadable image {path} ({reason}); "
                f"{self.skipped} skipped so far, see dataset.skipped_paths",
                stacklevel=3,
            )

    def _load(self, index: int) -> torch.Tensor | None:
        path = self.entries[index].image_path
        try:
            return load_image_tensor(path, self.image_size)
        except Exception as error:  # noqa: BLE001  any decode failure must skip, not crash
            self._mark_bad(index, f"{type(error).__name__}: {error}")
            return None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        count = len(self.entries)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} entries")
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self._bad_indices:
                continue
            image = self._load(candidate)
            if image is not None:
                return {
                    "image": image,
                    "captions": list(self.entries[candidate].captions),
                    "attributes": None,
                    "index": candidate,
                }
        raise RuntimeError(
            f"{self.description}: none of the {count} images could be read{self._examples()}"
        )

    def validate(self) -> int:
        """Decode every image now (a full pass, slow); marks bad ones. Returns how many were bad."""
        before = len(self._bad_indices)
        for index in range(len(self.entries)):
            if index not in self._bad_indices:
                self._load(index)
        return len(self._bad_indices) - before

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.description}, {len(self)} entries, "
            f"image_size={self.image_size}, skipped={self.skipped})"
        )


class JsonlManifestDataset(CaptionedImageFolderDataset):
    """Images and captions listed in a JSONL manifest.

    Each line is a JSON object ``{"image": "path.jpg", "captions": ["...", ...]}`` (a single
    ``"caption": "..."`` string is accepted too). Relative image paths are resolved against the
    manifest's folder, or ``image_root`` when given. Blank lines are ignored; malformed lines and
    lines without an image or captions are skipped and counted.
    """

    def __init__(
        self, manifest: str | Path, image_size: int = 64, image_root: str | Path | None = None
    ):
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(
                f"JSONL manifest {str(manifest)!r} does not exist; expected a file with one JSON "
                'object per line: {"image": "path.jpg", "captions": ["...", ...]}'
            )
        base = Path(image_root) if image_root is not None else manifest.parent
        entries: list[CaptionedImageEntry] = []
        skipped: list[tuple[str, str]] = []
        with manifest.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{manifest}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    skipped.append((where, f"invalid JSON ({error.msg})"))
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    skipped.append((where, 'no "image" path'))
                    continue
                captions = clean_captions(record.get("captions", record.get("caption")))
                image_path = Path(record["image"])
                image_path = image_path if image_path.is_absolute() else base / image_path
                if not captions:
                    skipped.append((str(image_path), "no captions"))
                    continue
                entries.append(CaptionedImageEntry(image_path, tuple(captions)))
        super().__init__(entries, image_size, f"JSONL manifest {manifest}", skipped)


def _read_name_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


class CubCaptionsDataset(CaptionedImageFolderDataset):
    """CUB-200-2011 birds with the Reed et al. captions (10 per image).

    Layout: ``root/images/<class>/<name>.jpg`` and ``root/text_c10/<class>/<name>.txt`` (one
    caption per line). Split, first found:
      1. class lists (Reed et al., class-disjoint): train -> ``trainvalclasses.txt`` (else
         ``trainclasses.txt``), val -> ``valclasses.txt``, test -> ``testclasses.txt``;
      2. the official image split ``images.txt`` + ``train_test_split.txt`` (train/test only);
      3. otherwise all images, with a warning. ``split="all"`` always takes all images.
    Images without a caption file (or with an empty one) are skipped and counted.
    """

    SPLITS = ("train", "val", "test", "all")

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 64):
        root = Path(root)
        expected = "root/images/<class>/<name>.jpg and root/text_c10/<class>/<name>.txt"
        _require_directory(root, f"CUB-200 root (expected {expected})")
        _require_directory(root / "images", f"CUB-200 images (expected {expected})")
        _require_directory(root / "text_c10", f"CUB-200 captions (expected {expected})")
        if split not in self.SPLITS:
            raise ValueError(f"CUB-200 split must be one of {self.SPLITS}, got {split!r}")
        keep = self._split_filter(root, split)
        entries: list[CaptionedImageEntry] = []
        skipped: list[tuple[str, str]] = []
        for class_folder in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
            for image_path in sorted(class_folder.iterdir()):
                if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if keep is not None and not keep(class_folder.name, image_path.name):
                    continue
                caption_path = root / "text_c10" / class_folder.name / f"{image_path.stem}.txt"
                captions = read_caption_file(caption_path)
                if not captions:
                    skipped.append((str(image_path), f"no captions in {caption_path}"))
                    continue
                entries.append(CaptionedImageEntry(image_path, tuple(captions)))
        super().__init__(entries, image_size, f"CUB-200 {root} split {split!r}", skipped)

    @staticmethod
    def _split_filter(root: Path, split: str):
        """A predicate (class name, file name) -> keep, or None for all images."""
        if split == "all":
            return None
        class_list_names = {
            "train": ("trainvalclasses.txt", "trainclasses.txt"),
            "val": ("valclasses.txt",),
            "test": ("testclasses.txt",),
        }[split]
        for name in class_list_names:
            if (root / name).is_file():
                classes = _read_name_list(root / name)
                return lambda class_name, file_name: class_name in classes
        images_file, split_file = root / "images.txt", root / "train_test_split.txt"
        if split in ("train", "test") and images_file.is_file() and split_file.is_file():
            relative_paths = dict(line.split(maxsplit=1) for line in _read_name_list(images_file))
            wanted = "1" if split == "train" else "0"
            selected = {
                relative_paths[image_id].strip()
                for image_id, is_train in (line.split() for line in _read_name_list(split_file))
                if is_train == wanted and image_id in relative_paths
            }
            return lambda class_name, file_name: f"{class_name}/{file_name}" in selected
        warnings.warn(
            f"CUB-200 {root}: no split file for split {split!r} (looked for "
            f"{', '.join(class_list_names)}, images.txt + train_test_split.txt); using all images",
            stacklevel=3,
        )
        return None


class CocoCaptionsDataset(CaptionedImageFolderDataset):
    """MS-COCO captions (about 5 per image).

    Layout: ``root/annotations/captions_<split><year>.json`` and images in
    ``root/<split><year>/<file_name>``; split is "train" or "val" (COCO test has no captions).
    Images without an annotation are skipped and counted.
    """

    SPLITS = ("train", "val")

    def __init__(
        self, root: str | Path, split: str = "train", image_size: int = 64, year: int = 2017
    ):
        root = Path(root)
        if split not in self.SPLITS:
            raise ValueError(
                f"MS-COCO split must be one of {self.SPLITS} (test has no captions), got {split!r}"
            )
        annotation_path = root / "annotations" / f"captions_{split}{year}.json"
        image_folder = root / f"{split}{year}"
        expected = f"root/annotations/captions_{split}{year}.json and root/{split}{year}/"
        _require_directory(root, f"MS-COCO root (expected {expected})")
        if not annotation_path.is_file():
            raise FileNotFoundError(
                f"MS-COCO captions file {str(annotation_path)!r} does not exist "
                f"(expected {expected})"
            )
        _require_directory(image_folder, f"MS-COCO images (expected {expected})")
        with annotation_path.open(encoding="utf-8") as file:
            annotations = json.load(file)
        captions_by_image: dict[int, list[str]] = defaultdict(list)
        for annotation in annotations.get("annotations", []):
            captions_by_image[annotation.get("image_id")].append(annotation.get("caption"))
        entries: list[CaptionedImageEntry] = []
        skipped: list[tuple[str, str]] = []
        for image in sorted(annotations.get("images", []), key=lambda record: record["id"]):
            image_path = image_folder / image["file_name"]
            captions = clean_captions(captions_by_image.get(image["id"], []))
            if not captions:
                skipped.append((str(image_path), "no captions"))
                continue
            entries.append(CaptionedImageEntry(image_path, tuple(captions)))
        super().__init__(entries, image_size, f"MS-COCO {root} split {split!r}", skipped)


class CelebAHQCaptionsDataset(CaptionedImageFolderDataset):
    """MM-CelebA-HQ faces with their captions (10 per image).

    Layout: ``root/CelebA-HQ-img/<id>.jpg`` and ``root/celeba-caption/<id>.txt``. Split: the ids
    listed (one per line, with or without suffix) in ``split_file`` or, when not given,
    ``root/<split>.txt``; with neither (or ``split="all"``) all images, with a warning unless
    ``split="all"``. Images without captions are skipped and counted.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 64,
        split_file: str | Path | None = None,
    ):
        root = Path(root)
        expected = "root/CelebA-HQ-img/<id>.jpg and root/celeba-caption/<id>.txt"
        _require_directory(root, f"MM-CelebA-HQ root (expected {expected})")
        _require_directory(root / "CelebA-HQ-img", f"MM-CelebA-HQ images (expected {expected})")
        _require_directory(root / "celeba-caption", f"MM-CelebA-HQ captions (expected {expected})")
        wanted_ids = None
        if split_file is not None:
            if not Path(split_file).is_file():
                raise FileNotFoundError(
                    f"MM-CelebA-HQ split_file {str(split_file)!r} does not exist"
                )
            wanted_ids = {Path(name).stem for name in _read_name_list(Path(split_file))}
        elif split != "all":
            if (root / f"{split}.txt").is_file():
                wanted_ids = {Path(name).stem for name in _read_name_list(root / f"{split}.txt")}
            else:
                warnings.warn(
                    f"MM-CelebA-HQ {root}: no split list {root / f'{split}.txt'}; "
                    f"using all images for split {split!r}",
                    stacklevel=2,
                )
        image_paths = sorted(
            (p for p in (root / "CelebA-HQ-img").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
            key=_natural_key,
        )
        entries: list[CaptionedImageEntry] = []
        skipped: list[tuple[str, str]] = []
        for image_path in image_paths:
            if wanted_ids is not None and image_path.stem not in wanted_ids:
                continue
            caption_path = root / "celeba-caption" / f"{image_path.stem}.txt"
            captions = read_caption_file(caption_path)
            if not captions:
                skipped.append((str(image_path), f"no captions in {caption_path}"))
                continue
            entries.append(CaptionedImageEntry(image_path, tuple(captions)))
        super().__init__(entries, image_size, f"MM-CelebA-HQ {root} split {split!r}", skipped)

"""``build_dataset``: one entry point from a data set name (config / CLI) to a Dataset."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from lgvq.data.folders import (
    CelebAHQCaptionsDataset,
    CocoCaptionsDataset,
    CubCaptionsDataset,
    JsonlManifestDataset,
)
from lgvq.data.shapes import ShapesDataset

DATASET_NAMES = ("shapes", "jsonl", "cub", "coco", "celeba")

_EXPECTED_ROOT = {
    "jsonl": "a .jsonl manifest, or a folder holding <split>.jsonl",
    "cub": "a folder holding images/ and text_c10/",
    "coco": "a folder holding annotations/ and <split>2017/",
    "celeba": "a folder holding CelebA-HQ-img/ and celeba-caption/",
}


def build_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int = 64,
    **options,
) -> Dataset:
    """Build a captioned-image data set by name.

    Args:
        name: one of DATASET_NAMES: "shapes" (generated, needs no root), "jsonl", "cub",
            "coco", "celeba".
        root: the data folder (or, for "jsonl", the manifest file itself).
        split: "train", "val", "test" (what each data set supports; see its class).
        image_size: side of the square output images in pixels.
        **options: passed to the class, e.g. ``size``, ``seed``, ``captions_per_image`` for
            shapes, ``year`` for coco, ``split_file`` for celeba, ``image_root`` for jsonl.

    Every data set yields {"image": float [3, image_size, image_size] in [-1, 1],
    "captions": list[str], "attributes": SceneAttributes or None, "index": int}.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set name {name!r}; choose one of {DATASET_NAMES}")
    if name == "shapes":
        if root is not None:
            raise ValueError(
                f"the shapes data set is generated and takes no root, got root={root!r}"
            )
        return ShapesDataset(split=split, image_size=image_size, **options)
    if root is None:
        raise ValueError(f"data set {name!r} needs root=<{_EXPECTED_ROOT[name]}>")
    root = Path(root)
    if name == "jsonl":
        manifest = root / f"{split}.jsonl" if root.is_dir() else root
        return JsonlManifestDataset(manifest, image_size=image_size, **options)
    classes = {
        "cub": CubCaptionsDataset,
        "coco": CocoCaptionsDataset,
        "celeba": CelebAHQCaptionsDataset,
    }
    return classes[name](root, split=split, image_size=image_size, **options)


def dataset_captions(dataset: Dataset) -> list[str]:
    """Every caption of every item of ``dataset``, item by item, without loading images where
    the data set can say its captions alone (captioned shapes, the folder data sets)."""
    if isinstance(dataset, ShapesDataset):
        return [c for i in range(len(dataset)) for c in dataset.captions(i)]
    entries = getattr(dataset, "entries", None)
    if entries is not None:
        return [c for entry in entries for c in entry.captions]
    return [c for i in range(len(dataset)) for c in dataset[i]["captions"]]

"""Captioned images from local folders: loading, skipping bad entries, errors, build_dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgvq.data import (
    DATASET_NAMES,
    CelebAHQCaptionsDataset,
    CocoCaptionsDataset,
    CubCaptionsDataset,
    JsonlManifestDataset,
    ShapesDataset,
    build_dataset,
    collate_captioned_images,
    load_image_tensor,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _write_image(path: Path, colour=RED, size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write_striped_image(path: Path) -> Path:
    """60 x 20: left third red, middle green, right third blue; its centre square is green."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :20] = RED
    pixels[:, 20:40] = GREEN
    pixels[:, 40:] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG at all" * 10)
    return path


def _write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load_all(dataset):
    return [dataset[index] for index in range(len(dataset))]


# --------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------


def test_load_image_resizes_shorter_side_and_crops_the_centre(tmp_path):
    image = load_image_tensor(_write_striped_image(tmp_path / "striped.png"), 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    # Only the green middle third is kept (bicubic reads a few pixels past the crop: skip edges).
    assert torch.allclose(image[:, :, 1:-1], expected[:, :, 1:-1], atol=0.05)


def test_load_image_converts_any_mode_to_rgb(tmp_path):
    Image.new("L", (30, 40), 255).save(tmp_path / "grey.png")
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    grey = load_image_tensor(tmp_path / "grey.png", 8)
    alpha = load_image_tensor(tmp_path / "alpha.png", 8)
    assert grey.shape == alpha.shape == (3, 8, 8)
    assert torch.allclose(grey, torch.ones_like(grey))
    assert alpha.min() >= -1 and alpha.max() <= 1


# --------------------------------------------------------------------------------------------
# JSONL manifest and skipping
# --------------------------------------------------------------------------------------------


def _write_manifest(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    _write_image(folder / "images" / "red.png", RED)
    _write_striped_image(folder / "images" / "striped.jpg")
    _write_corrupt(folder / "images" / "corrupt.jpg")
    absolute = _write_image(tmp_path / "elsewhere" / "blue.png", BLUE)
    records = [
        {"image": "images/red.png", "captions": ["a red square", "  ", "red everywhere"]},
        {"image": "images/corrupt.jpg", "captions": ["broken bytes"]},
        {"image": "images/missing.png", "captions": ["never written"]},
        {"image": "images/striped.jpg", "caption": "three stripes"},
        {"image": "images/red.png", "captions": []},
        {"image": str(absolute), "captions": ["a blue square"]},
    ]
    lines = [json.dumps(record) for record in records]
    lines.insert(2, "{not json")
    lines.insert(3, "")
    return _write_lines(folder / "train.jsonl", lines)


def test_jsonl_manifest_items_and_skips(tmp_path):
    manifest = _write_manifest(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 entries while building"):
        dataset = JsonlManifestDataset(manifest, image_size=16)
    assert len(dataset) == 5  # entries with captions, bad images included until read
    assert dataset.skipped == 2  # the invalid JSON line and the entry without captions

    with pytest.warns(UserWarning, match="skipped unreadable image"):
        items = _load_all(dataset)
    for item in items:
        assert item["image"].shape == (3, 16, 16)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["attributes"] is None and item["captions"]
    assert items[0]["captions"] == ["a red square", "red everywhere"]
    # Index 1 (corrupt) and 2 (missing) fall back to the next good entry, index 3.
    assert [item["index"] for item in items] == [0, 3, 3, 3, 4]
    assert items[3]["captions"] == ["three stripes"]
    assert items[4]["captions"] == ["a blue square"]
    assert torch.allclose(items[4]["image"][2], torch.ones(16, 16))  # absolute path, blue

    assert dataset.skipped == 4
    skipped = dataset.skipped_paths
    assert any(path.endswith("corrupt.jpg") for path in skipped)
    assert any(path.endswith("missing.png") for path in skipped)
    assert any(path.endswith("train.jsonl:3") for path in skipped)  # the invalid JSON line
    assert "no captions" in dataset.skip_reasons[str(manifest.parent / "images" / "red.png")]
    # A second epoch finds nothing new and stays quiet.
    _load_all(dataset)
    assert dataset.skipped == 4


def test_validate_marks_bad_images_up_front(tmp_path):
    with pytest.warns(UserWarning):
        dataset = JsonlManifestDataset(_write_manifest(tmp_path), image_size=8)
        assert dataset.validate() == 2
    assert dataset.skipped == 4
    assert dataset[1]["index"] == 3


def test_a_manifest_of_only_bad_images_raises_on_read_not_on_build(tmp_path):
    _write_corrupt(tmp_path / "bad.jpg")
    record = json.dumps({"image": "bad.jpg", "captions": ["x"]})
    manifest = _write_lines(tmp_path / "m.jsonl", [record])
    dataset = JsonlManifestDataset(manifest)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="none of the 1 images"):
        dataset[0]


def test_jsonl_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        JsonlManifestDataset(tmp_path / "nowhere.jsonl")
    empty = _write_lines(tmp_path / "empty.jsonl", [json.dumps({"image": "a.png", "captions": []})])
    with pytest.raises(ValueError, match="no usable entries"):
        JsonlManifestDataset(empty)


def test_collate_batches_folder_items(tmp_path):
    with pytest.warns(UserWarning):
        dataset = JsonlManifestDataset(_write_manifest(tmp_path), image_size=8)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=3, collate_fn=collate_captioned_images
        )
        batches = list(loader)
    assert [batch["image"].shape[0] for batch in batches] == [3, 2]
    assert batches[0]["attributes"] == [None, None, None]


# --------------------------------------------------------------------------------------------
# CUB-200, MS-COCO, MM-CelebA-HQ layouts
# --------------------------------------------------------------------------------------------


def _write_cub(root: Path) -> Path:
    for class_name, names in {"001.Albatross": ["a_1", "a_2"], "002.Auklet": ["b_1"]}.items():
        for name in names:
            _write_image(root / "images" / class_name / f"{name}.jpg")
            if name != "a_2":  # a_2 has no caption file
                _write_lines(root / "text_c10" / class_name / f"{name}.txt",
                             [f"caption {k} of {name}" for k in range(10)])
    return root


def test_cub_reads_captions_and_class_splits(tmp_path):
    root = _write_cub(tmp_path / "cub")
    with pytest.warns(UserWarning, match="no split file"):
        with pytest.warns(UserWarning, match="skipped 1 entries"):
            everything = CubCaptionsDataset(root, split="train", image_size=8)
    assert len(everything) == 2 and everything.skipped == 1
    item = everything[0]
    assert item["captions"][0] == "caption 0 of a_1" and len(item["captions"]) == 10

    _write_lines(root / "trainvalclasses.txt", ["002.Auklet"])
    _write_lines(root / "testclasses.txt", ["001.Albatross"])
    train = CubCaptionsDataset(root, split="train", image_size=8)
    assert [entry.image_path.name for entry in train.entries] == ["b_1.jpg"]
    with pytest.warns(UserWarning, match="skipped 1 entries"):
        test = CubCaptionsDataset(root, split="test", image_size=8)
    assert [entry.image_path.name for entry in test.entries] == ["a_1.jpg"]


def test_cub_official_image_split(tmp_path):
    root = _write_cub(tmp_path / "cub")
    _write_lines(
        root / "images.txt",
        ["1 001.Albatross/a_1.jpg", "2 001.Albatross/a_2.jpg", "3 002.Auklet/b_1.jpg"],
    )
    _write_lines(root / "train_test_split.txt", ["1 0", "2 1", "3 1"])
    with pytest.warns(UserWarning, match="skipped 1 entries"):
        train = CubCaptionsDataset(root, split="train")
    assert [entry.image_path.name for entry in train.entries] == ["b_1.jpg"]
    test = CubCaptionsDataset(root, split="test")
    assert [entry.image_path.name for entry in test.entries] == ["a_1.jpg"]


def test_cub_missing_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_root.*does not exist"):
        CubCaptionsDataset(tmp_path / "no_such_root")
    (tmp_path / "cub" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="text_c10"):
        CubCaptionsDataset(tmp_path / "cub")
    with pytest.raises(ValueError, match="split"):
        CubCaptionsDataset(_write_cub(tmp_path / "cub2"), split="validation")


def _write_coco(root: Path) -> Path:
    _write_image(root / "val2017" / "000000000001.jpg", RED)
    _write_image(root / "val2017" / "000000000002.jpg", GREEN)
    _write_image(root / "val2017" / "000000000003.jpg", BLUE)
    annotations = {
        "images": [
            {"id": 2, "file_name": "000000000002.jpg"},
            {"id": 1, "file_name": "000000000001.jpg"},
            {"id": 3, "file_name": "000000000003.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a red picture. "},
            {"id": 11, "image_id": 1, "caption": "all red"},
            {"id": 12, "image_id": 2, "caption": "a green picture"},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))
    return root


def test_coco_groups_captions_by_image(tmp_path):
    root = _write_coco(tmp_path / "coco")
    with pytest.warns(UserWarning, match="skipped 1 entries"):
        dataset = CocoCaptionsDataset(root, split="val", image_size=8)
    assert len(dataset) == 2 and dataset.skipped == 1
    first, second = _load_all(dataset)
    assert first["captions"] == ["a red picture.", "all red"]
    assert second["captions"] == ["a green picture"]
    assert torch.allclose(first["image"][0], torch.ones(8, 8), atol=0.05)  # red, JPEG-rounded
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        CocoCaptionsDataset(root, split="train")
    with pytest.raises(ValueError, match="test has no captions"):
        CocoCaptionsDataset(root, split="test")


def _write_celeba(root: Path) -> Path:
    for image_id in (0, 1, 2, 10):
        _write_image(root / "CelebA-HQ-img" / f"{image_id}.jpg")
        if image_id != 1:
            captions = [f"face {image_id}", "", "smiling"]
            _write_lines(root / "celeba-caption" / f"{image_id}.txt", captions)
    return root


def test_celeba_ids_captions_and_split_file(tmp_path):
    root = _write_celeba(tmp_path / "celeba")
    with pytest.warns(UserWarning, match="skipped 1 entries"):
        everything = CelebAHQCaptionsDataset(root, split="all", image_size=8)
    assert [entry.image_path.stem for entry in everything.entries] == ["0", "2", "10"]
    assert everything[2]["captions"] == ["face 10", "smiling"]
    _write_lines(root / "test.txt", ["2.jpg", "10"])
    test = CelebAHQCaptionsDataset(root, split="test", image_size=8)
    assert [entry.image_path.stem for entry in test.entries] == ["2", "10"]
    with pytest.raises(FileNotFoundError, match="CelebA-HQ-img"):
        CelebAHQCaptionsDataset(tmp_path / "missing_root")


# --------------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------------


def test_build_dataset_maps_names_to_classes(tmp_path):
    assert set(DATASET_NAMES) == {"shapes", "jsonl", "cub", "coco", "celeba"}
    shapes = build_dataset("shapes", split="val", image_size=32, size=4, seed=1)
    assert isinstance(shapes, ShapesDataset) and shapes[0]["image"].shape == (3, 32, 32)
    manifest = _write_manifest(tmp_path)
    with pytest.warns(UserWarning):
        from_folder = build_dataset("jsonl", manifest.parent, split="train", image_size=8)
        from_file = build_dataset("jsonl", manifest, image_size=8)
    assert isinstance(from_folder, JsonlManifestDataset) and len(from_folder) == len(from_file) == 5
    with pytest.warns(UserWarning):
        coco = build_dataset("coco", _write_coco(tmp_path / "coco"), split="val")
        cub = build_dataset("cub", _write_cub(tmp_path / "cub"), split="all")
        celeba = build_dataset("celeba", _write_celeba(tmp_path / "celeba"), split="all")
    assert isinstance(coco, CocoCaptionsDataset)
    assert isinstance(cub, CubCaptionsDataset)
    assert isinstance(celeba, CelebAHQCaptionsDataset)


def test_build_dataset_errors_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown data set name 'imagenet'.*'shapes'.*'celeba'"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("cub")
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("shapes", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        build_dataset("jsonl", tmp_path, split="val")

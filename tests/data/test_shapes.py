"""The built-in captioned-shapes data set: determinism, splits, ranges, caption correctness."""

import time

import pytest
import torch
from torch.utils.data import DataLoader

from lgvq.data import (
    ALL_ATTRIBUTE_WORDS,
    ATTRIBUTE_WORDS,
    CAPTION_TEMPLATE_COUNT,
    COLOUR_NAMES,
    SHAPE_NAMES,
    ShapesDataset,
    caption_for,
    caption_vocabulary,
    caption_words,
    collate_captioned_images,
    draw_captions_per_image,
    draw_one_caption_per_image,
    find_attribute_words,
    generate_captioned_scene,
)
from lgvq.data.shapes import (
    COUNT_WORDS,
    MAX_CAPTION_WORDS,
    REGION_PHRASES,
    RELATION_PHRASES,
    RELATION_PRONOUN_PHRASES,
    SIZE_SYNONYMS,
)

SIZE_OF_WORD = {word: size for size, words in SIZE_SYNONYMS.items() for word in words}


def _items_equal(first: dict, second: dict) -> bool:
    return (
        torch.equal(first["image"], second["image"])
        and first["captions"] == second["captions"]
        and first["attributes"] == second["attributes"]
        and first["index"] == second["index"]
    )


# --------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_items_in_any_access_order():
    first = ShapesDataset("train", size=50, seed=3)
    second = ShapesDataset("train", size=50, seed=3)
    forward = [first[index] for index in range(20)]
    backward = [second[index] for index in reversed(range(20))][::-1]
    for one, other in zip(forward, backward):
        assert _items_equal(one, other)
    assert _items_equal(first[-1], first[49])


def test_different_seed_gives_different_items():
    first = ShapesDataset("train", size=20, seed=0)
    second = ShapesDataset("train", size=20, seed=1)
    differing_images = sum(
        not torch.equal(first[i]["image"], second[i]["image"]) for i in range(20)
    )
    differing_captions = sum(first[i]["captions"] != second[i]["captions"] for i in range(20))
    assert differing_images == 20
    assert differing_captions >= 18


def test_splits_are_disjoint():
    count = 100
    fingerprints = {}
    for split in ("train", "val", "test"):
        dataset = ShapesDataset(split, size=count, image_size=32)
        fingerprints[split] = {dataset[i]["image"].numpy().tobytes() for i in range(count)}
        assert len(fingerprints[split]) == count  # no repeats inside a split either
    assert not fingerprints["train"] & fingerprints["val"]
    assert not fingerprints["train"] & fingerprints["test"]
    assert not fingerprints["val"] & fingerprints["test"]


@pytest.mark.parametrize("image_size", [32, 48, 64, 100, 256])
def test_image_shape_dtype_and_range(image_size):
    dataset = ShapesDataset("val", size=10, image_size=image_size, captions_per_image=6)
    for index in range(3):
        item = dataset[index]
        image = item["image"]
        assert image.shape == (3, image_size, image_size)
        assert image.dtype == torch.float32 and image.is_contiguous()
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.max() - image.min() > 0.5  # shapes are drawn, not a blank canvas
        assert len(item["captions"]) == 6 and item["index"] == index


def test_scene_and_captions_do_not_depend_on_image_size():
    small = generate_captioned_scene(seed=0, split="train", index=7, image_size=32)
    large = generate_captioned_scene(seed=0, split="train", index=7, image_size=256)
    assert small.attributes == large.attributes and small.captions == large.captions
    # The large render, averaged down to 32x32, is close to the small render.
    downsampled = torch.nn.functional.avg_pool2d(
        torch.from_numpy(large.image.copy()).permute(2, 0, 1).float()[None], 8
    )[0]
    small_image = torch.from_numpy(small.image.copy()).permute(2, 0, 1).float()
    assert (downsampled - small_image).abs().mean() < 6.0


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("validation")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=4)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=0)
    with pytest.raises(ValueError, match="captions_per_image"):
        ShapesDataset(captions_per_image=0)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(min_objects=2, max_objects=4)
    with pytest.raises(IndexError):
        ShapesDataset(size=5)[5]
    with pytest.raises(ValueError, match="template_id"):
        caption_for(generate_captioned_scene(0, "train", 0).attributes, CAPTION_TEMPLATE_COUNT)


def test_object_counts_follow_the_range():
    dataset = ShapesDataset("train", size=200, image_size=32, min_objects=2, max_objects=3)
    counts = {dataset[i]["attributes"].count for i in range(60)}
    assert counts == {2, 3}


# --------------------------------------------------------------------------------------------
# Captions against attributes
# --------------------------------------------------------------------------------------------

# Every phrase that can follow an object mention, longest first so that "on the left of"
# (a relation) wins over "on the left" (a region) and "at the top left" over "at the top".
_FOLLOWING_PHRASES = sorted(
    [
        (tuple(phrase.split()), kind, name)
        for kind, table in (
            ("region", REGION_PHRASES),
            ("relation", RELATION_PHRASES),
            ("pronoun", RELATION_PRONOUN_PHRASES),
        )
        for name, phrases in table.items()
        for phrase in phrases
    ],
    key=lambda entry: -len(entry[0]),
)


def _check_caption(caption: str, attributes, statistics: dict) -> None:
    """Parse a caption and assert that everything it states holds for the attributes."""
    assert caption == caption.lower()
    words = caption_words(caption)
    assert 1 <= len(words) <= MAX_CAPTION_WORDS, caption
    object_by_pair = {(item.colour, item.shape): i for i, item in enumerate(attributes.objects)}
    mentions = [  # (position of the shape word, object index)
        (position, object_by_pair.get((words[position - 1], word), -1))
        for position, word in enumerate(words)
        if word in SHAPE_NAMES and position > 0 and words[position - 1] in COLOUR_NAMES
    ]
    assert all(index >= 0 for _, index in mentions), f"names an absent object: {caption!r}"
    assert {index for _, index in mentions} == set(range(attributes.count)), caption
    # Colour and shape words appear only as "colour shape" pairs.
    assert sum(word in COLOUR_NAMES for word in words) == len(mentions), caption
    assert sum(word in SHAPE_NAMES for word in words) == len(mentions), caption

    for mention_number, (position, index) in enumerate(mentions):
        item = attributes.objects[index]
        if position >= 2 and words[position - 2] in SIZE_OF_WORD:
            assert SIZE_OF_WORD[words[position - 2]] == item.size, caption
            statistics["size"] += 1
        rest = words[position + 1 :]
        if rest[:1] == ["is"]:  # "the red circle is [big and] at the top"
            rest = rest[1:]
            if rest[:1] and rest[0] in SIZE_OF_WORD:
                assert SIZE_OF_WORD[rest[0]] == item.size and rest[1] == "and", caption
                rest = rest[2:]
                statistics["size"] += 1
        for phrase, kind, name in _FOLLOWING_PHRASES:
            if tuple(rest[: len(phrase)]) != phrase:
                continue
            if kind == "region":
                assert name == item.region, f"{caption!r}: the {item.shape} is at {item.region}"
                statistics["region"] += 1
            elif kind == "relation":
                reference = mentions[mention_number + 1][1]
                assert name in attributes.relations_between(index, reference), caption
                statistics["relation"] += 1
            else:  # "<anchor> with <object> to its left": the anchor is the first mention
                anchor = mentions[0][1]
                assert name in attributes.relations_between(index, anchor), caption
                statistics["relation"] += 1
            break

    if words[:2] == ["there", "is"]:
        assert words[2] == "one" and attributes.count == 1, caption
        statistics["count"] += 1
    if words[:2] == ["there", "are"]:
        assert words[2] == COUNT_WORDS[attributes.count - 1], caption
        statistics["count"] += 1


def test_every_caption_states_only_true_attributes():
    dataset = ShapesDataset("train", size=250, image_size=32, captions_per_image=7)
    vocabulary = set(caption_vocabulary())
    statistics = {"size": 0, "region": 0, "relation": 0, "count": 0}
    for index in range(250):
        item = dataset[index]
        captions = item["captions"]
        assert len(captions) == 7 and len(set(captions)) == 7, captions
        for caption in captions:
            assert set(caption_words(caption)) <= vocabulary, caption
            _check_caption(caption, item["attributes"], statistics)
    # The parser did check every kind of statement, many times.
    assert min(statistics.values()) > 100, statistics


def test_caption_for_is_a_pure_function_and_templates_differ():
    scene = generate_captioned_scene(seed=0, split="test", index=11, min_objects=3).attributes
    templates = range(CAPTION_TEMPLATE_COUNT)
    captions = [caption_for(scene, template, variant=5) for template in templates]
    assert captions == [caption_for(scene, template, variant=5) for template in templates]
    assert len(set(captions)) == CAPTION_TEMPLATE_COUNT
    variants = {caption_for(scene, 0, variant) for variant in range(40)}
    assert len(variants) > 3  # synonyms and object order change with the variant
    for caption in captions:
        _check_caption(caption, scene, {"size": 0, "region": 0, "relation": 0, "count": 0})


def test_attribute_words_for_masking():
    assert set(ATTRIBUTE_WORDS["colour"]) == set(COLOUR_NAMES)
    assert set(ATTRIBUTE_WORDS["shape"]) == set(SHAPE_NAMES)
    assert {"left", "right", "above", "below"} <= set(ATTRIBUTE_WORDS["relation"])
    assert {"small", "large", "big"} <= set(ATTRIBUTE_WORDS["size"])
    assert ALL_ATTRIBUTE_WORDS <= set(caption_vocabulary())
    found = find_attribute_words("a big red circle, to the left of a small blue square")
    assert found == [(1, "big"), (2, "red"), (3, "circle"), (6, "left"), (9, "small"),
                     (10, "blue"), (11, "square")]


# --------------------------------------------------------------------------------------------
# Batching, caption draws, speed
# --------------------------------------------------------------------------------------------


def test_collate_and_seeded_caption_draw_are_reproducible():
    dataset = ShapesDataset("train", size=32, image_size=32)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_captioned_images)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert batch["index"].tolist() == list(range(8))
    assert len(batch["captions"]) == 8 and len(batch["attributes"]) == 8
    assert batch["captions"][3] == dataset[3]["captions"]

    def draws(seed, steps=20):
        generator = torch.Generator().manual_seed(seed)
        return [draw_one_caption_per_image(batch["captions"], generator) for _ in range(steps)]

    first, again, other = draws(123), draws(123), draws(124)
    assert first == again and first != other
    for step in first:
        assert all(caption in options for caption, options in zip(step, batch["captions"]))
    # Over the steps every caption position of image 0 gets drawn (uniform over 5 options).
    drawn = {batch["captions"][0].index(step[0]) for step in draws(7, steps=200)}
    assert drawn == set(range(5))
    with pytest.raises(ValueError, match="no caption"):
        draw_one_caption_per_image([["a"], []])


def test_several_captions_per_image_are_distinct_where_there_are_enough():
    options = [["a", "b", "c", "d", "e"], ["x", "y"], ["z"]]
    drawn = draw_captions_per_image(options, 3, torch.Generator().manual_seed(1))
    assert len(drawn) == 9
    assert len(set(drawn[:3])) == 3 and set(drawn[:3]) <= set(options[0])
    assert set(drawn[3:6]) == {"x", "y"} and drawn[6:] == ["z"] * 3
    # one caption per image: the same draws as draw_one_caption_per_image
    assert draw_captions_per_image(options, 1, torch.Generator().manual_seed(5)) \
        == draw_one_caption_per_image(options, torch.Generator().manual_seed(5))
    # every caption of an image is drawn first in some step (a random order, not a fixed one)
    generator = torch.Generator().manual_seed(2)
    assert {draw_captions_per_image(options, 2, generator)[0] for _ in range(100)} \
        == set(options[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="per_image must be a positive integer"):
            draw_captions_per_image(options, bad)
    with pytest.raises(ValueError, match="no caption"):
        draw_captions_per_image([["a"], []], 2)


def test_generation_speed_is_reported(capsys):
    """Reports items/s at 64x64 on one thread (not asserted: machines differ).

    CPU time of this process is the measure (wall time on a shared machine counts other
    processes too); the best of three rounds is kept.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = ShapesDataset("train", size=10_000, image_size=64)
        dataset[0]
        per_round = 150
        best_cpu_seconds, best_wall_seconds = float("inf"), float("inf")
        for round_number in range(3):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for index in range(round_number * per_round, (round_number + 1) * per_round):
                dataset[index]
            best_cpu_seconds = min(best_cpu_seconds, time.process_time() - cpu_start)
            best_wall_seconds = min(best_wall_seconds, time.perf_counter() - wall_start)
    finally:
        torch.set_num_threads(threads)
    cpu_rate = per_round / max(best_cpu_seconds, 1e-9)
    wall_rate = per_round / max(best_wall_seconds, 1e-9)
    with capsys.disabled():
        print(
            f"\n[shapes] 64x64 items (image + attributes + 5 captions), one thread: "
            f"{cpu_rate:.0f}/s of CPU time, {wall_rate:.0f}/s wall clock"
        )
    assert cpu_rate > 0

"""Captions of captioned shapes: templates with synonyms, a pure function of (scene, template,
variant), and the word tools that parse captions back (attribute words, vocabulary)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from lgvq.data.shapes.scenes import SceneAttributes, ShapeObject
from lgvq.data.shapes.vocabulary import (
    ALL_ATTRIBUTE_WORDS,
    COUNT_WORDS,
    REGION_PHRASES,
    RELATION_PHRASES,
    RELATION_PRONOUN_PHRASES,
    SIZE_SYNONYMS,
    TEMPLATE_WORDS,
)


def _mix(variant: int, slot: int) -> int:
    """A 16-bit hash of (variant, slot): independent synonym choices per slot, cheaply.

    Multiplicative hashing; the high bits of the product depend on all bits of the input.
    """
    return ((((variant + (slot + 1) * 0x9E3779B9) & 0xFFFFFFFF) * 0x85EBCA6B) >> 16) & 0xFFFF


def _pick(options: Sequence[str], variant: int, slot: int) -> str:
    return options[_mix(variant, slot) % len(options)]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun_phrase(
    item: ShapeObject, variant: int, slot: int, with_size: bool, definite: bool = False
) -> str:
    words = f"{item.colour} {item.shape}"
    if with_size:
        words = f"{_pick(SIZE_SYNONYMS[item.size], variant, slot)} {words}"
    return f"the {words}" if definite else _with_article(words)


def _position_phrase(item: ShapeObject, variant: int, slot: int) -> str:
    return _pick(REGION_PHRASES[item.region], variant, slot)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _object_order(scene: SceneAttributes, variant: int) -> list[int]:
    rotation = _mix(variant, 999) % scene.count
    order = list(range(scene.count))
    return order[rotation:] + order[:rotation]


def _relation(scene: SceneAttributes, subject: int, reference: int, variant: int, slot: int) -> str:
    # Objects occupy distinct cells, so at least one relation always holds.
    return _pick(scene.relations_between(subject, reference), variant, slot)


def _template_list_with_sizes(scene: SceneAttributes, variant: int) -> str:
    # "a big red circle, a small blue square and a tiny green cross"
    order = _object_order(scene, variant)
    return _join([_noun_phrase(scene.objects[i], variant, 10 * i, True) for i in order])


def _template_list_with_positions(scene: SceneAttributes, variant: int) -> str:
    # "a large red circle at the top left and a small blue square in the centre"
    order = _object_order(scene, variant)
    return _join(
        [
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, True)} "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )


def _template_count(scene: SceneAttributes, variant: int) -> str:
    # "there is one green triangle at the top" / "there are two shapes: a red circle and ..."
    order = _object_order(scene, variant)
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        position = _position_phrase(item, variant, 1)
        return f"there is one {size} {item.colour} {item.shape} {position}"
    noun = _pick(("shapes", "objects"), variant, 2)
    listed = _join([_noun_phrase(scene.objects[i], variant, 10 * i, True) for i in order])
    return f"there are {COUNT_WORDS[scene.count - 1]} {noun}: {listed}"


def _template_relations(scene: SceneAttributes, variant: int) -> str:
    # "a big red circle to the left of a small blue square and a green cross below the blue square"
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        return f"a single {size} {item.colour} {item.shape} {_position_phrase(item, variant, 1)}"
    order = _object_order(scene, variant)
    first, anchor = order[0], order[1]
    caption = (
        f"{_noun_phrase(scene.objects[first], variant, 10 * first, True)} "
        f"{_pick(RELATION_PHRASES[_relation(scene, first, anchor, variant, 50)], variant, 51)} "
        f"{_noun_phrase(scene.objects[anchor], variant, 10 * anchor, True)}"
    )
    if scene.count == 3:
        third = order[2]
        caption += (
            f" and {_noun_phrase(scene.objects[third], variant, 10 * third, True)} "
            f"{_pick(RELATION_PHRASES[_relation(scene, third, anchor, variant, 60)], variant, 61)} "
            f"{_noun_phrase(scene.objects[anchor], variant, 0, False, definite=True)}"
        )
    return caption


def _template_picture(scene: SceneAttributes, variant: int) -> str:
    # "a picture of a red circle at the top left and a blue square in the centre"
    order = _object_order(scene, variant)
    frame = _pick(("a picture of", "an image of", "a drawing of"), variant, 3)
    listed = _join(
        [
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, False)} "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )
    return f"{frame} {listed}"


def _template_definite(scene: SceneAttributes, variant: int) -> str:
    # "the red circle is at the top left and the blue square is in the centre"
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        return f"the {item.colour} {item.shape} is {size} and {_position_phrase(item, variant, 1)}"
    order = _object_order(scene, variant)
    return _join(
        [
            f"the {scene.objects[i].colour} {scene.objects[i].shape} is "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )


def _template_anchor(scene: SceneAttributes, variant: int) -> str:
    # "a small blue square with a big red circle to its left and a green cross above it"
    if scene.count == 1:
        item = scene.objects[0]
        return (
            f"{_noun_phrase(item, variant, 0, True)} {_position_phrase(item, variant, 1)} "
            "and nothing else"
        )
    order = _object_order(scene, variant)
    anchor, others = order[0], order[1:]
    parts = []
    for i in others:
        relation = _relation(scene, i, anchor, variant, 50 + i)
        parts.append(
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, True)} "
            f"{_pick(RELATION_PRONOUN_PHRASES[relation], variant, 60 + i)}"
        )
    anchor_phrase = _noun_phrase(scene.objects[anchor], variant, 10 * anchor, True)
    return f"{anchor_phrase} with {' and '.join(parts)}"


_CAPTION_TEMPLATES = (
    _template_list_with_sizes,
    _template_list_with_positions,
    _template_count,
    _template_relations,
    _template_picture,
    _template_definite,
    _template_anchor,
)
CAPTION_TEMPLATE_COUNT = len(_CAPTION_TEMPLATES)


def caption_for(scene: SceneAttributes, template_id: int, variant: int = 0) -> str:
    """The caption of ``scene`` by template ``template_id`` (0 .. CAPTION_TEMPLATE_COUNT - 1).

    ``variant`` (any non-negative int) picks synonyms and the order in which objects are listed;
    the result is a pure function of (scene, template_id, variant).
    """
    if not 0 <= template_id < CAPTION_TEMPLATE_COUNT:
        raise ValueError(
            f"template_id must be in [0, {CAPTION_TEMPLATE_COUNT - 1}], got {template_id}"
        )
    return _CAPTION_TEMPLATES[template_id](scene, int(variant))


def sample_captions(
    scene: SceneAttributes, generator: np.random.Generator, count: int
) -> list[str]:
    """``count`` captions of the scene: distinct templates first, then repeats with new variants.

    Duplicate strings are avoided where the scene allows it (a one-object scene has few).
    Consumes one ``generator.random`` call.
    """
    uniforms = generator.random(CAPTION_TEMPLATE_COUNT + count).tolist()
    template_order = list(range(CAPTION_TEMPLATE_COUNT))
    for position in range(CAPTION_TEMPLATE_COUNT - 1):  # Fisher-Yates
        swap = position + int(uniforms[position] * (CAPTION_TEMPLATE_COUNT - position))
        template_order[position], template_order[swap] = (
            template_order[swap],
            template_order[position],
        )
    variants = [int(u * 2**31) for u in uniforms[CAPTION_TEMPLATE_COUNT:]]
    captions: list[str] = []
    seen: set[str] = set()
    for position in range(count):
        template_id = template_order[position % CAPTION_TEMPLATE_COUNT]
        caption = caption_for(scene, template_id, variants[position])
        retries = 0
        while caption in seen and retries < 8:  # deterministic: new variants derived from the old
            retries += 1
            caption = caption_for(scene, template_id, _mix(variants[position], 1000 + retries))
        seen.add(caption)
        captions.append(caption)
    return captions


def caption_words(caption: str) -> list[str]:
    """The caption's words, lowercase, punctuation removed ("circle," -> "circle")."""
    return re.findall(r"[a-z]+", caption.lower())


def find_attribute_words(caption: str) -> list[tuple[int, str]]:
    """(word index, word) of every attribute word, indices into ``caption_words(caption)``."""
    words = caption_words(caption)
    return [(index, word) for index, word in enumerate(words) if word in ALL_ATTRIBUTE_WORDS]


def caption_vocabulary() -> list[str]:
    """Every word that a caption can contain, sorted."""
    words = set(TEMPLATE_WORDS) | set(ALL_ATTRIBUTE_WORDS)
    for table in (REGION_PHRASES, RELATION_PHRASES, RELATION_PRONOUN_PHRASES):
        for phrases in table.values():
            for phrase in phrases:
                words.update(phrase.split())
    return sorted(words)

"""The understanding tasks on a frozen tokenizer's codes: captioning, VQA, visual grounding
(the paper's Tables 11, 9 and 8).

One model, ``CodeTextModel``: the codes embedded from the tokenizer's codebook (the shared
``CodeEmbedding``; ``--embedding=learned`` for a plain table), text tokens, and the generation
tasks' transformer blocks (SDPA, KV cache).

* ``caption`` (ClipCap-style): the codes are the prefix of a causal text decoder; it is trained
  by next-token cross-entropy on [BOS] caption [EOS] after the codes and decodes greedily or by
  beam search (``--beam_size``; greedy is beam 1) with the KV cache. The whole sequence is
  causal, codes included, as ClipCap's GPT-2 reads its prefix.
* ``vqa``: codes + question tokens + a [READ] token through the bidirectional blocks; the
  final state at [READ] feeds a classifier over the single-word answers seen in training.
* ``ground`` (TransVG-like): the same with a referring expression; the box is read at
  [READ], trained by 5 L1 + 2 (1 - GIoU) as TransVG, scored by Acc@IoU>0.5. ``--box_head``:
  ``regress`` is TransVG's head (sigmoid (cx, cy, w, h) from [READ]'s final state);
  ``pointer`` (default) keeps the regressed size but takes the centre as the attention-weighted
  mean of the code cells' centres, [READ]'s state the query over the codes' final states.
  Measured on the demo's LG-VQ seed-0 codes (width 96, 2 layers, batch 32): ``regress`` stayed
  at chance (Acc@0.5 0.054 after 600 steps, the mean training box 0.058), ``pointer`` reached
  0.117 (mean IoU 0.178) after 400.

Text tokens are the frozen text encoder's WordPiece tokens. ``--text_vocab=data`` (default)
keeps the ids that occur in the training texts (plus [PAD], [BOS], [EOS], [READ], [UNK]): on
captioned shapes a few dozen instead of 30522, so the decoder's softmax is ~500x smaller on 2
cores; ``--text_vocab=full`` keeps the encoder's whole vocabulary.

Data. Captioned shapes knows every object exactly, so questions, answers, boxes and referring
expressions are derived from the scene (``scene_questions``, ``scene_referring``): each
description is the shortest of (shape), (colour shape), (size shape), (size colour shape) that
matches one object only, else it names the object's grid cell too (one object per cell), and
never contains the attribute asked about. Questions are drawn per image from a generator seeded
by (split, index) only: a fixed split (the validation images' questions are never trained on).
Real data: ``--qa_folder`` (COCO-QA-style) and ``--ref_folder`` (RefCOCO-style) hold
``train.jsonl`` and ``val.jsonl``, a line per question or expression:

  {"image": "a.jpg", "question": "what is on the table", "answer": "cat"}
  {"image": "a.jpg", "expression": "the man on the left", "box": [x, y, w, h]}

(image paths relative to the folder; the box in pixels of the original image, COCO's
convention, and moved with the image's resize and centre crop). Captioning reads the captions
of the tokenizer's own data set (captioned shapes, CUB, a JSONL folder, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lgvq.data import COLOUR_NAMES, SHAPE_NAMES, SceneAttributes
from lgvq.data.shapes.rendering import object_masks
from lgvq.data.shapes.vocabulary import COUNT_WORDS, REGION_PHRASES, SIZE_NAMES
from lgvq.downstream.codes import FrozenTokenizer, encode_image_files, encode_split
from lgvq.downstream.transformer import Block, CodeEmbedding, KVCache, TransformerShape

UNDERSTANDING_TASKS = ("caption", "vqa", "ground")
TEXT_VOCABS = ("data", "full")
PAD, BOS, EOS, READ, UNK = 0, 1, 2, 3, 4
SPECIALS = 5
_QA_TAG = 0x51A  # keeps the question draws apart from every other (split, index) stream
_SPLIT_NUMBER = {"train": 0, "val": 1}
QUESTION_KINDS = ("colour", "shape", "size", "count", "relation")
_FIELDS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


# ----------------------------------------------------------------------------------------------
# questions and referring expressions from exact scenes
# ----------------------------------------------------------------------------------------------


def describe(scene: SceneAttributes, index: int, hide: str = "") -> str:
    """A noun phrase that matches ``scene.objects[index]`` only and does not name its ``hide``
    attribute ("the small red circle", "the circle on the left", "the red object")."""
    item = scene.objects[index]
    for fields in [f for f in _FIELDS + (("colour",), ("size", "colour")) if hide not in f]:
        same = [o for o in scene.objects if all(getattr(o, f) == getattr(item, f)
                                                for f in fields)]
        if len(same) == 1:
            words = [getattr(item, f) for f in fields]
            return "the " + " ".join(words + ([] if "shape" in fields else ["object"]))
    words = [getattr(item, f) for f in ("size", "colour", "shape") if f != hide]
    noun = words if hide != "shape" else words + ["object"]
    return "the " + " ".join(noun) + " " + REGION_PHRASES[item.region][0]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def scene_questions(scene: SceneAttributes, split: str, index: int,
                    count: int) -> list[tuple[str, str, str]]:
    """``count`` (question, answer, kind) about ``scene``, drawn from a generator seeded by
    (split, index) only; every answer is exact (one word)."""
    generator = np.random.default_rng([_QA_TAG, _SPLIT_NUMBER.get(split, 2), index])
    objects = scene.objects
    questions = []
    for _ in range(count):
        kinds = [k for k in QUESTION_KINDS if k != "relation" or len(objects) > 1]
        kind = kinds[int(generator.integers(len(kinds)))]
        item_index = int(generator.integers(len(objects)))
        item = objects[item_index]
        if kind == "colour":
            questions.append((f"what colour is {describe(scene, item_index, 'colour')}",
                              item.colour, kind))
        elif kind == "shape":
            questions.append((f"what shape is {describe(scene, item_index, 'shape')}",
                              item.shape, kind))
        elif kind == "size":
            questions.append((f"what size is {describe(scene, item_index, 'size')}",
                              item.size, kind))
        elif kind == "count":
            if generator.random() < 0.5:
                questions.append(("how many objects are there", COUNT_WORDS[len(objects) - 1],
                                  kind))
            else:
                shape = SHAPE_NAMES[int(generator.integers(len(SHAPE_NAMES)))]
                number = sum(o.shape == shape for o in objects)
                questions.append((f"how many {_plural(shape)} are there",
                                  (("zero",) + COUNT_WORDS)[number], kind))
        else:
            other = (item_index + 1 + int(generator.integers(len(objects) - 1))) % len(objects)
            relation = ("left of", "right of", "above", "below")[int(generator.integers(4))]
            holds = {"left of": item.column < objects[other].column,
                     "right of": item.column > objects[other].column,
                     "above": item.row < objects[other].row,
                     "below": item.row > objects[other].row}[relation]
            questions.append((f"is {describe(scene, item_index)} {relation} "
                              f"{describe(scene, other)}", "yes" if holds else "no", kind))
    return questions


def shapes_answers() -> list[str]:
    """Every answer a captioned-shapes question can have (the classifier's classes there)."""
    return sorted(set(COLOUR_NAMES) | set(SHAPE_NAMES) | set(SIZE_NAMES) | set(COUNT_WORDS)
                  | {"zero", "yes", "no"})


def scene_referring(scene: SceneAttributes, image_size: int) -> list[tuple[str, list[float]]]:
    """(expression, box) of every object: ``describe`` and the bounding box of its exact mask
    ``[x0, y0, x1, y1]`` in fractions of the image side."""
    masks = object_masks(scene, image_size)
    result = []
    for index, mask in enumerate(masks):
        rows, columns = np.nonzero(mask)
        box = [columns.min() / image_size, rows.min() / image_size,
               (columns.max() + 1) / image_size, (rows.max() + 1) / image_size]
        result.append((describe(scene, index), [float(v) for v in box]))
    return result


# ----------------------------------------------------------------------------------------------
# examples: one row per (image, text)
# ----------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """The examples of one split: codes per example, its text and its target."""

    codes: torch.Tensor  # int64 [E, L] (the example's image's codes, raster order)
    image: torch.Tensor  # int64 [E] the image each example reads
    texts: list[str]  # caption / question / referring expression
    answers: list[str] = field(default_factory=list)  # vqa
    kinds: list[str] = field(default_factory=list)  # vqa on shapes: the question's kind
    boxes: torch.Tensor | None = None  # ground: float [E, 4] (x0, y0, x1, y1) in [0, 1]
    references: list[list[str]] = field(default_factory=list)  # caption: the image's captions


def _read_jsonl(path: Path, option: str, keys: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--{option}: {path} not found (a folder with train.jsonl and "
                                f"val.jsonl, one JSON object with {', '.join(keys)} per line)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--{option}: {path}:{number}: invalid JSON ({error.msg})") from None
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"--{option}: {path}:{number}: missing {missing}")
        records.append(record)
    if not records:
        raise ValueError(f"--{option}: {path} has no examples")
    return records


def _fitted_box(box, original: tuple[int, int]) -> list[float]:
    """A pixel box ``[x, y, w, h]`` of an image of ``original`` (width, height) after the
    loaders' resize of the shorter side and centre crop, as ``[x0, y0, x1, y1]`` fractions of
    the crop, clipped to it."""
    width, height = original
    side = min(width, height)
    x0 = (float(box[0]) - (width - side) / 2) / side
    y0 = (float(box[1]) - (height - side) / 2) / side
    values = [x0, y0, x0 + float(box[2]) / side, y0 + float(box[3]) / side]
    return [min(1.0, max(0.0, v)) for v in values]


def folder_examples(config, tokenizer: FrozenTokenizer, split: str) -> Examples:
    """VQA or grounding examples of ``<folder>/<split>.jsonl`` (the module docstring)."""
    from PIL import Image

    option = "qa_folder" if config.task == "vqa" else "ref_folder"
    folder = Path(getattr(config, option))
    keys = ("image", "question", "answer") if config.task == "vqa" else ("image", "expression",
                                                                          "box")
    records = _read_jsonl(folder / f"{split}.jsonl", option, keys)
    limit = config.train_images if split == "train" else config.eval_images
    paths = list(dict.fromkeys(str(folder / r["image"]) for r in records))
    paths = paths[:limit] if limit else paths
    position = {p: i for i, p in enumerate(paths)}
    records = [r for r in records if str(folder / r["image"]) in position]
    codes = encode_image_files(tokenizer, paths, config.cache_dir or None, option)
    image = torch.tensor([position[str(folder / r["image"])] for r in records])
    examples = Examples(codes.reshape(len(paths), -1)[image], image,
                        [str(r["question" if config.task == "vqa" else "expression"])
                         for r in records])
    if config.task == "vqa":
        examples.answers = [str(r["answer"]).strip().lower() for r in records]
        return examples
    sizes = {}
    for path in paths:
        with Image.open(path) as opened:
            sizes[path] = opened.size
    try:
        examples.boxes = torch.tensor([_fitted_box(r["box"], sizes[str(folder / r["image"])])
                                       for r in records], dtype=torch.float32)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"--ref_folder: every box must be [x, y, w, h] in pixels "
                         f"({folder / split}.jsonl)") from None
    return examples


def split_examples(config, tokenizer: FrozenTokenizer, split: str) -> Examples:
    """The examples of ``split`` ("train" or "val") for the task (module docstring)."""
    if config.task in ("vqa", "ground") and getattr(
            config, "qa_folder" if config.task == "vqa" else "ref_folder"):
        return folder_examples(config, tokenizer, split)
    images = config.train_images if split == "train" else config.eval_images
    codes = encode_split(tokenizer, split, images, config.cache_dir or None)
    sequences = codes.sequences()
    rows: list[int] = []
    examples = Examples(sequences[:0], torch.zeros(0, dtype=torch.long), [])
    if config.task == "caption":
        for index, options in enumerate(codes.captions):
            rows += [index] * len(options)
            examples.texts += options
            examples.references += [options] * len(options)
    elif codes.attributes is None:
        option = "qa_folder" if config.task == "vqa" else "ref_folder"
        raise ValueError(f"{config.task} needs questions or referring expressions: captioned "
                         f"shapes gives them exactly; other data sets need --{option}=<folder "
                         "with train.jsonl and val.jsonl>")
    elif config.task == "vqa":
        for index, scene in enumerate(codes.attributes):
            for question, answer, kind in scene_questions(scene, split, index,
                                                          config.questions_per_image):
                rows.append(index)
                examples.texts.append(question)
                examples.answers.append(answer)
                examples.kinds.append(kind)
    else:
        boxes = []
        for index, scene in enumerate(codes.attributes):
            for expression, box in scene_referring(scene, tokenizer.config.image_size):
                rows.append(index)
                examples.texts.append(expression)
                boxes.append(box)
        examples.boxes = torch.tensor(boxes, dtype=torch.float32)
    examples.image = torch.tensor(rows, dtype=torch.long)
    examples.codes = sequences[examples.image]
    return examples


# ----------------------------------------------------------------------------------------------
# text tokens
# ----------------------------------------------------------------------------------------------


class TextVocabulary:
    """Local token ids over the frozen text encoder's WordPiece ids: 0-4 are [PAD] [BOS] [EOS]
    [READ] [UNK], then the kept encoder ids in increasing order."""

    def __init__(self, text_encoder, kept_ids: list[int]):
        self.hf = text_encoder.tokenizer
        self.encoder_ids = sorted(set(kept_ids))
        self.local = {e: SPECIALS + i for i, e in enumerate(self.encoder_ids)}

    def __len__(self) -> int:
        return SPECIALS + len(self.encoder_ids)

    @classmethod
    def build(cls, text_encoder, texts: list[str], which: str) -> TextVocabulary:
        if which == "full":
            return cls(text_encoder, list(range(text_encoder.vocab_size)))
        ids = text_encoder.tokenizer(sorted(set(texts)), add_special_tokens=False)["input_ids"]
        return cls(text_encoder, [i for row in ids for i in row])

    def encode(self, texts: list[str], length: int, *, caption: bool) -> torch.Tensor:
        """int64 ``[N, length]``: captions as [BOS] tokens [EOS] [PAD]..., questions as
        tokens [PAD]... (truncated to fit)."""
        rows = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        result = torch.full((len(rows), length), PAD, dtype=torch.long)
        for index, ids in enumerate(rows):
            local = [self.local.get(i, UNK) for i in ids]
            local = [BOS] + local[:length - 2] + [EOS] if caption else local[:length]
            result[index, :len(local)] = torch.tensor(local, dtype=torch.long)
        return result

    def decode(self, local: list[int]) -> str:
        ids = [self.encoder_ids[t - SPECIALS] for t in local if t >= SPECIALS]
        return self.hf.decode(ids)


_SPEC_CACHE: dict = {}


@dataclass
class TaskSpec:
    """What sizes a task's model: its text vocabulary and (vqa) its answers."""

    vocabulary: TextVocabulary
    answers: list[str]


def task_spec(config, tokenizer: FrozenTokenizer) -> TaskSpec:
    """The vocabulary (from the training texts) and answer classes of the task; a pure
    function of the config's data options and the tokenizer, memoised per process."""
    key = (config.task, tokenizer.digest, config.train_images, config.text_vocab,
           config.qa_folder, config.ref_folder, config.questions_per_image)
    if key not in _SPEC_CACHE:
        train = split_examples(config, tokenizer, "train")
        vocabulary = TextVocabulary.build(tokenizer.text_encoder, train.texts, config.text_vocab)
        answers = []
        if config.task == "vqa":
            shapes = not config.qa_folder
            answers = shapes_answers() if shapes else sorted(set(train.answers))
        _SPEC_CACHE[key] = TaskSpec(vocabulary, answers)
    return _SPEC_CACHE[key]


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


class CodeTextModel(nn.Module):
    """[codes] + [text tokens] (+ [READ]) through the code transformer's blocks; ``head``
    reads text logits (caption) or the [READ] state (answer logits, box)."""

    def __init__(self, shape: TransformerShape, text_vocab: int, text_length: int, outputs: int,
                 codebook: torch.Tensor | None, embedding: str, pointer: bool = False):
        super().__init__()
        if shape.width % shape.heads:
            raise ValueError(f"width ({shape.width}) must be a multiple of heads ({shape.heads})")
        self.shape = shape
        self.codes = CodeEmbedding(shape.codebook_size, shape.width, codebook, embedding)
        self.tokens = nn.Embedding(text_vocab, shape.width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = nn.Parameter(torch.zeros(shape.length + text_length + 1, shape.width))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, outputs)
        self.pointer = nn.Linear(shape.width, shape.width) if pointer else None
        if pointer:  # the centre of every code cell, (x, y) in [0, 1], raster order
            side = math.isqrt(shape.length)
            steps = (torch.arange(side, dtype=torch.float32) + 0.5) / side
            y, x = torch.meshgrid(steps, steps, indexing="ij")
            self.register_buffer("cell_centres", torch.stack([x, y], -1).reshape(-1, 2),
                                 persistent=False)

    def hidden(self, codes: torch.Tensor | None, tokens: torch.Tensor | None,
               cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final normed states of [codes] + [tokens] at positions ``start..``."""
        parts = [self.codes(codes)] if codes is not None else []
        parts += [self.tokens(tokens)] if tokens is not None else []
        x = torch.cat(parts, dim=1)
        x = x + self.positions[start:start + x.shape[1]]
        for index, block in enumerate(self.blocks):
            x = block(x, index, cache=cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)

    def forward(self, codes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """caption: text logits ``[B, T - 1, V]`` predicting ``tokens[:, 1:]``; otherwise the
        head at [READ] after the tokens, ``[B, outputs]``."""
        if self.shape.causal:
            states = self.hidden(codes, tokens[:, :-1])
            return self.head(states[:, codes.shape[1]:])
        read = torch.full((len(tokens), 1), READ, dtype=torch.long, device=tokens.device)
        states = self.hidden(codes, torch.cat([tokens, read], dim=1))
        output = self.head(states[:, -1])
        if self.pointer is None:
            return output
        # box_head=pointer: [READ] attends over the code states; the centre is the attention-
        # weighted mean of the cells' centres (as a logit, so boxes_from_output reads both heads)
        scores = torch.einsum("bw,blw->bl", self.pointer(states[:, -1]),
                              states[:, :codes.shape[1]]) / math.sqrt(self.shape.width)
        centre = scores.softmax(-1) @ self.cell_centres.to(scores.dtype)
        return torch.cat([torch.logit(centre, eps=1e-4), output[:, 2:]], dim=1)


def build_understanding_model(config, tokenizer: FrozenTokenizer) -> CodeTextModel:
    spec = task_spec(config, tokenizer)
    shape = TransformerShape(codebook_size=tokenizer.codebook_size,
                             length=tokenizer.grid * tokenizer.grid, width=config.width,
                             layers=config.layers, heads=config.heads, dropout=config.dropout,
                             causal=config.task == "caption")
    outputs = {"caption": len(spec.vocabulary), "vqa": len(spec.answers), "ground": 4}
    codebook = tokenizer.codebook() if config.embedding == "codebook" else None
    return CodeTextModel(shape, len(spec.vocabulary), config.text_length,
                         outputs[config.task], codebook, config.embedding,
                         pointer=config.task == "ground" and config.box_head == "pointer")


# ----------------------------------------------------------------------------------------------
# data of a task and its loss
# ----------------------------------------------------------------------------------------------


def prepare_understanding(config, tokenizer: FrozenTokenizer, split: str):
    """The ``TaskData`` of ``split``: ``sequences`` the codes per example, ``prefix`` the text
    tokens, ``targets`` the answer classes (vqa) or boxes (ground), ``examples`` the rest."""
    from lgvq.downstream.tasks import TaskData

    spec = task_spec(config, tokenizer)
    examples = split_examples(config, tokenizer, split)
    tokens = spec.vocabulary.encode(examples.texts, config.text_length,
                                    caption=config.task == "caption")
    targets = None
    if config.task == "vqa":  # an answer never seen in training is class -1: always wrong
        index = {a: i for i, a in enumerate(spec.answers)}
        targets = torch.tensor([index.get(a, -1) for a in examples.answers])
    elif config.task == "ground":
        targets = examples.boxes
    return TaskData(None, examples.codes, tokens, targets=targets, examples=examples, spec=spec)


def boxes_from_output(output: torch.Tensor) -> torch.Tensor:
    """Head output ``[B, 4]`` -> boxes ``[x0, y0, x1, y1]`` (sigmoid centre and size)."""
    centre, size = output.sigmoid().split(2, dim=1)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def generalised_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU of matching rows (Rezatofighi et al. 2019): IoU minus the share of the enclosing
    box that neither covers."""
    from lgvq.downstream.metrics import box_iou

    iou = box_iou(predicted, target)
    low = torch.maximum(predicted[:, :2], target[:, :2])
    high = torch.minimum(predicted[:, 2:], target[:, 2:])
    intersection = (high - low).clamp(min=0).prod(1)
    areas = [(b[:, 2:] - b[:, :2]).clamp(min=0).prod(1) for b in (predicted, target)]
    union = areas[0] + areas[1] - intersection
    hull = (torch.maximum(predicted[:, 2:], target[:, 2:])
            - torch.minimum(predicted[:, :2], target[:, :2])).clamp(min=0).prod(1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def understanding_loss(config, model: CodeTextModel, data, rows: torch.Tensor,
                       device) -> torch.Tensor:
    codes = data.sequences[rows].to(device)
    tokens = data.prefix[rows].to(device)
    output = model(codes, tokens)
    if config.task == "caption":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), tokens[:, 1:].reshape(-1),
                               ignore_index=PAD)
    target = data.targets[rows].to(device)
    if config.task == "vqa":
        return F.cross_entropy(output, target, ignore_index=-1)
    boxes = boxes_from_output(output)
    # TransVG's weights: 5 x L1 of the corners + 2 x (1 - GIoU)
    return 5 * F.l1_loss(boxes, target) + 2 * (1 - generalised_iou(boxes, target)).mean()


# ----------------------------------------------------------------------------------------------
# caption decoding
# ----------------------------------------------------------------------------------------------


def _reorder(cache: KVCache, order: torch.Tensor) -> None:
    for table in (cache.keys, cache.values):
        for index in table:
            table[index] = table[index][order]


@torch.no_grad()
def decode_captions(model: CodeTextModel, codes: torch.Tensor, *, beam_size: int = 1,
                    max_tokens: int = 30) -> list[list[int]]:
    """Beam search (beam 1: greedy) over the text decoder after the codes ``[B, L]``, with the
    KV cache; the score of a caption is its summed log-probability (no length normalisation),
    a beam ends at [EOS]. Returns each item's best local token ids, [EOS] excluded."""
    batch, length = codes.shape
    width = beam_size
    cache = KVCache()
    model.hidden(codes, None, cache)
    _reorder(cache, torch.arange(batch, device=codes.device).repeat_interleave(width))
    scores = torch.full((batch, width), float("-inf"), device=codes.device)
    scores[:, 0] = 0.0
    sequences = torch.zeros(batch * width, 0, dtype=torch.long, device=codes.device)
    last = torch.full((batch * width, 1), BOS, dtype=torch.long, device=codes.device)
    finished = torch.zeros(batch * width, dtype=torch.bool, device=codes.device)
    for step in range(max_tokens):
        states = model.hidden(None, last, cache, start=length + step)
        logp = model.head(states[:, -1]).float().log_softmax(-1)
        eos = logp[:, EOS].clone()
        logp[:, :SPECIALS] = float("-inf")  # only words and [EOS] are decoded
        logp[:, EOS] = eos
        logp[finished] = float("-inf")
        logp[finished, PAD] = 0.0  # a finished beam keeps its score
        vocab = logp.shape[1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, width * vocab)
        scores, chosen = total.topk(width, dim=1)
        origin = (chosen // vocab + torch.arange(batch, device=codes.device)[:, None] * width)
        origin, token = origin.reshape(-1), (chosen % vocab).reshape(-1)
        _reorder(cache, origin)
        sequences = torch.cat([sequences[origin], token[:, None]], dim=1)
        finished = finished[origin] | (token == EOS)
        last = token[:, None]
        if bool(finished.all()):
            break
    best = sequences.reshape(batch, width, -1)[:, 0]
    return [[t for t in row.tolist() if t >= SPECIALS] for row in best]


__all__ = ["CodeTextModel", "Examples", "QUESTION_KINDS", "TEXT_VOCABS", "TextVocabulary",
           "UNDERSTANDING_TASKS", "boxes_from_output", "build_understanding_model",
           "decode_captions", "describe", "generalised_iou", "prepare_understanding",
           "scene_questions", "scene_referring", "shapes_answers", "split_examples",
           "task_spec", "understanding_loss"]

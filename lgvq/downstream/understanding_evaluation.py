"""Scoring a trained understanding task on the held-out split, with its chance levels.

* caption: BLEU-4, ROUGE-L, METEOR, CIDEr-D (``lgvq.downstream.metrics``) of the greedy and the
  beam-search caption of every held-out image against all its captions (METEOR for beam and
  chance only: each score starts a Java process, ~5 s); chance: one caption for every image,
  the training split's most frequent one.
* vqa: accuracy (and per question kind on captioned shapes); chance: the training split's
  majority answer, and the majority answer per question kind (what a model reading only the
  question's kind gets: the question prior without the image).
* ground: Acc@IoU>0.5 and mean IoU; chance: the training split's mean box for every expression.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from lgvq.downstream.codes import FrozenTokenizer
from lgvq.downstream.metrics import (
    box_iou,
    caption_scores,
    grounding_accuracy,
    vqa_accuracy,
    wups,
)
from lgvq.downstream.tasks import DownstreamConfig, load_task_model, task_data, task_loss
from lgvq.downstream.understanding import boxes_from_output, decode_captions
from lgvq.evaluation.report import write_markdown_report
from lgvq.files import atomic_write
from lgvq_kernels import resolve_device


def _majority(values: list[str]) -> str:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties: the first in sorted order


def _batched(model, data, rows: torch.Tensor, device, size: int = 256) -> torch.Tensor:
    return torch.cat([model(data.sequences[rows[i:i + size]].to(device),
                            data.prefix[rows[i:i + size]].to(device)).float().cpu()
                      for i in range(0, len(rows), size)])


def _score_caption(config, model, data, train, device, scores, notes, predictions):
    examples = data.examples
    firsts = sorted({int(i): row for row, i in reversed(list(enumerate(examples.image)))}.items())
    rows = torch.tensor([row for _, row in firsts])
    references = [examples.references[row] for _, row in firsts]
    vocabulary = data.spec.vocabulary
    decoded = {}
    for name, beam in (("greedy", 1), ("beam", config.beam_size)):
        ids = []
        for start in range(0, len(rows), 64):
            chunk = data.sequences[rows[start:start + 64]].to(device)
            ids += decode_captions(model, chunk, beam_size=beam,
                                   max_tokens=config.text_length - 2)
        decoded[name] = [vocabulary.decode(t) for t in ids]
        values, why = caption_scores(references, decoded[name],
                                     meteor=config.meteor and name == "beam")
        scores.update({f"{name}_{k}": v for k, v in values.items()})
        notes += [n for n in why if n not in notes]
    chance = _majority(train.examples.texts)
    values, _ = caption_scores(references, [chance] * len(references), meteor=config.meteor)
    scores.update({f"chance_{k}": v for k, v in values.items()})
    scores["chance_caption"] = chance
    scores["beam_size"] = config.beam_size
    for index, (image, _) in enumerate(firsts):
        predictions.append({"image": image, "greedy": decoded["greedy"][index],
                            "beam": decoded["beam"][index], "references": references[index]})


def _score_vqa(model, data, train, device, scores, notes, predictions):
    examples, answers = data.examples, data.spec.answers
    logits = _batched(model, data, torch.arange(len(examples.texts)), device)
    predicted = [answers[i] for i in logits.argmax(1).tolist()]
    scores["accuracy"] = vqa_accuracy(predicted, examples.answers)
    majority = _majority(train.examples.answers)
    scores["chance_majority_answer"] = majority
    scores["chance_accuracy"] = vqa_accuracy([majority] * len(predicted), examples.answers)
    for threshold in (0.9, 0.0):
        value, why = wups(predicted, examples.answers, threshold)
        scores[f"wups_{threshold}"] = value
        notes += [why] if why and why not in notes else []
    if examples.kinds:
        prior = {kind: _majority([a for a, k in zip(train.examples.answers, train.examples.kinds)
                                  if k == kind]) for kind in set(train.examples.kinds)}
        scores["chance_kind_prior_accuracy"] = vqa_accuracy(
            [prior.get(k, majority) for k in examples.kinds], examples.answers)
        for kind in sorted(set(examples.kinds)):
            chosen = [i for i, k in enumerate(examples.kinds) if k == kind]
            scores[f"accuracy_{kind}"] = vqa_accuracy([predicted[i] for i in chosen],
                                                      [examples.answers[i] for i in chosen])
    for index, text in enumerate(examples.texts):
        predictions.append({"image": int(examples.image[index]), "question": text,
                            "answer": examples.answers[index], "predicted": predicted[index]})


def _score_ground(model, data, train, device, scores, predictions):
    examples = data.examples
    boxes = boxes_from_output(_batched(model, data, torch.arange(len(examples.texts)), device))
    scores["accuracy_iou_0.5"] = grounding_accuracy(boxes, examples.boxes)
    scores["mean_iou"] = float(box_iou(boxes, examples.boxes).mean())
    mean_box = train.examples.boxes.mean(0, keepdim=True).expand_as(examples.boxes)
    scores["chance_accuracy_iou_0.5"] = grounding_accuracy(mean_box, examples.boxes)
    scores["chance_mean_iou"] = float(box_iou(mean_box, examples.boxes).mean())
    for index, text in enumerate(examples.texts):
        predictions.append({"image": int(examples.image[index]), "expression": text,
                            "box": [round(v, 4) for v in examples.boxes[index].tolist()],
                            "predicted": [round(v, 4) for v in boxes[index].tolist()]})


def evaluate_understanding(config: DownstreamConfig, checkpoint: str | Path,
                           tokenizer: FrozenTokenizer, out_dir: str | Path | None = None) -> dict:
    """Scores of a trained caption / vqa / ground model (module docstring); writes
    ``metrics.json``, ``predictions.jsonl`` and ``report.md`` into ``out_dir`` (default: the
    checkpoint's folder)."""
    device = resolve_device(config.device)
    out_dir = Path(out_dir or Path(checkpoint).parent)
    train = task_data(config, tokenizer, "train")
    data = task_data(config, tokenizer, "val")
    model = load_task_model(checkpoint, config, tokenizer, device)
    scores: dict = {"task": config.task, "embedding": config.embedding,
                    "text_vocab": config.text_vocab, "vocabulary_size": len(data.spec.vocabulary),
                    "eval_examples": len(data.sequences),
                    "eval_images": len(set(data.examples.image.tolist()))}
    notes: list[str] = []
    predictions: list[dict] = []
    state = torch.get_rng_state()
    with torch.no_grad():
        scores["heldout_loss"] = float(task_loss(config, model, data,
                                                 torch.arange(len(data.sequences)), 0, device))
        if config.task == "caption":
            _score_caption(config, model, data, train, device, scores, notes, predictions)
        elif config.task == "vqa":
            _score_vqa(model, data, train, device, scores, notes, predictions)
        else:
            _score_ground(model, data, train, device, scores, predictions)
    torch.set_rng_state(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json", json.dumps(scores, indent=2))
    atomic_write(out_dir / "predictions.jsonl",
                 "".join(json.dumps(p) + "\n" for p in predictions))
    write_markdown_report(out_dir / "report.md", f"lgvq downstream {config.task}",
                          [{"metric": k, "value": v} for k, v in scores.items()],
                          columns=["metric", "value"], notes=notes)
    return scores


__all__ = ["evaluate_understanding"]

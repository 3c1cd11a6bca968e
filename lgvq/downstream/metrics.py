"""Scores of the understanding tasks, through the established implementations where one exists.

* Captioning (the paper's Table 11): BLEU-4, ROUGE-L, CIDEr-D and METEOR from pycocoevalcap
  1.2 (the COCO caption evaluation code; its ``Cider`` is CIDEr-D: Gaussian length penalty with
  sigma 6 and clipped n-gram counts). METEOR runs the library's bundled ``meteor-1.5.jar`` and
  needs Java; without Java (or without the library) the score is None and the reason is given.
  SPICE is never used (its first run downloads Stanford CoreNLP). Captions are tokenised here
  (lowercase words, punctuation dropped) instead of by the library's PTBTokenizer, which starts
  a Java process per call: for the captions these tasks score (plain lowercase words) both give
  the same tokens.
* VQA (Table 9): accuracy, exact match of the predicted single-word answer. WUPS needs
  WordNet's data (nltk's corpus), which is not installed here: ``wups`` says so.
* Grounding (Table 8): Acc@IoU>0.5, the fraction of predicted boxes whose IoU with the true box
  exceeds 0.5 (boxes ``[x0, y0, x1, y1]``, fractions of the image side).
"""

from __future__ import annotations

import re
import shutil

import torch

METEOR_MISSING = "METEOR not computed: {why} (pycocoevalcap runs meteor-1.5.jar with java)"
CAPTION_METRICS = ("bleu4", "rouge_l", "cider_d", "meteor")


def caption_tokens(text: str) -> str:
    """Lowercase words joined by single spaces (punctuation and WordPiece ``##`` joins gone)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace(" ##", "")))


def caption_scores(references: list[list[str]], candidates: list[str], *,
                   meteor: bool = True) -> tuple[dict, list[str]]:
    """Corpus BLEU-4, ROUGE-L, CIDEr-D (and METEOR) of ``candidates[i]`` against
    ``references[i]``, through pycocoevalcap. Returns (scores, notes): a score is None when its
    implementation is unavailable, and a note says why."""
    if len(references) != len(candidates) or not candidates:
        raise ValueError(f"references and candidates must be non-empty and of one length, got "
                         f"{len(references)} and {len(candidates)}")
    if any(not options for options in references):
        raise ValueError("references: every item needs at least one reference caption")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return dict.fromkeys(CAPTION_METRICS), [
            "caption metrics not computed: pycocoevalcap is not installed "
            "(pip install pycocoevalcap==1.2, pinned in requirements.txt)"]
    gts = {i: [caption_tokens(r) for r in options] for i, options in enumerate(references)}
    res = {i: [caption_tokens(c) or "empty"] for i, c in enumerate(candidates)}
    scores = {"bleu4": float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
              "rouge_l": float(Rouge().compute_score(gts, res)[0]),
              "cider_d": float(Cider().compute_score(gts, res)[0]), "meteor": None}
    notes = []
    if meteor:
        scores["meteor"], note = meteor_score(gts, res)
        notes += [note] if note else []
    return scores, notes


def meteor_score(gts: dict, res: dict) -> tuple[float | None, str]:
    """(METEOR, "") from pycocoevalcap's Meteor, or (None, why not) without Java."""
    if shutil.which("java") is None:
        return None, METEOR_MISSING.format(why="java is not on PATH")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0]), ""
    except (OSError, ValueError) as error:
        return None, METEOR_MISSING.format(why=f"the jar failed: {error}")
    finally:
        # the library's __del__ closes it too; closing here ends the JVM before the next scorer
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def vqa_accuracy(predicted: list[str], answers: list[str]) -> float:
    """Exact-match accuracy of single-word answers (COCO-QA has one answer per question)."""
    if len(predicted) != len(answers) or not answers:
        raise ValueError(f"predicted and answers must be non-empty and of one length, got "
                         f"{len(predicted)} and {len(answers)}")
    return sum(p == a for p, a in zip(predicted, answers)) / len(answers)


def wups(predicted: list[str], answers: list[str], threshold: float) -> tuple[float | None, str]:
    """WUPS needs WordNet (nltk's wordnet corpus); (None, why) where it is not installed."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except (ImportError, LookupError):
        return None, ("WUPS not computed: it needs WordNet data (nltk with its wordnet corpus), "
                      "which is not installed; nothing is downloaded")

    def similarity(word: str, truth: str) -> float:  # Wu-Palmer over noun synsets, 1 if equal
        if word == truth:
            return 1.0
        best = max((a.wup_similarity(b) or 0.0 for a in wordnet.synsets(word, "n")
                    for b in wordnet.synsets(truth, "n")), default=0.0)
        return best if best >= threshold else 0.1 * best  # Malinowski & Fritz's down-weighting

    return sum(similarity(p, a) for p, a in zip(predicted, answers)) / len(answers), ""


def box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``[N, 4]`` box tensors ``[x0, y0, x1, y1]``
    (torchvision's definition; boxes of zero area have IoU 0)."""
    if predicted.shape != target.shape or predicted.dim() != 2 or predicted.shape[1] != 4:
        raise ValueError(f"boxes must both be [N, 4], got {tuple(predicted.shape)} and "
                         f"{tuple(target.shape)}")
    low = torch.maximum(predicted[:, :2], target[:, :2])
    high = torch.minimum(predicted[:, 2:], target[:, 2:])
    intersection = (high - low).clamp(min=0).prod(1)

    def area(boxes):
        return (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)

    union = area(predicted) + area(target) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12),
                       torch.zeros_like(union))


def grounding_accuracy(predicted: torch.Tensor, target: torch.Tensor,
                       threshold: float = 0.5) -> float:
    """Acc@IoU>threshold: the fraction of rows whose IoU exceeds ``threshold``."""
    return float((box_iou(predicted.float(), target.float()) > threshold).float().mean())


__all__ = ["CAPTION_METRICS", "box_iou", "caption_scores", "caption_tokens",
           "grounding_accuracy", "vqa_accuracy", "wups"]

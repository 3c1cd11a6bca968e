"""The understanding metrics: pycocoevalcap's BLEU-4, ROUGE-L, CIDEr-D and METEOR on a small
fixed corpus (the values the library itself gives, called directly), box IoU, VQA accuracy."""

import shutil

import pytest
import torch

from lgvq.downstream.metrics import (
    box_iou,
    caption_scores,
    caption_tokens,
    grounding_accuracy,
    vqa_accuracy,
    wups,
)

REFERENCES = [["A red circle on the left.", "there is a red circle"],
              ["two blue squares", "a picture of two blue squares"],
              ["a small green triangle at the top", "a green triangle"]]
CANDIDATES = ["a red circle", "Two blue squares!", "a green triangle at the top"]
# pycocoevalcap 1.2 on the lowercased, punctuation-free corpus, called directly:
# Bleu(4).compute_score(gts, res)[0][3], Rouge(), Cider(), Meteor() (meteor-1.5.jar, Java 17)
LIBRARY = {"bleu4": 0.7037259478154194, "rouge_l": 0.9058823529411765,
           "cider_d": 5.262161963676049, "meteor": 0.4977952773272382}


def test_caption_scores_are_the_librarys_on_a_fixed_corpus():
    pytest.importorskip("pycocoevalcap")
    scores, notes = caption_scores(REFERENCES, CANDIDATES, meteor=shutil.which("java")
                                   is not None)
    for name in ("bleu4", "rouge_l", "cider_d"):
        assert scores[name] == pytest.approx(LIBRARY[name], rel=1e-12), name
    if shutil.which("java"):
        assert scores["meteor"] == pytest.approx(LIBRARY["meteor"], rel=1e-9) and not notes
    assert caption_tokens("A red circle, on the left.") == "a red circle on the left"


def test_caption_scores_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="one length"):
        caption_scores(REFERENCES, CANDIDATES[:2])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores([[]], ["a circle"])


def test_meteor_without_java_is_none_with_the_reason(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    scores, notes = caption_scores(REFERENCES, CANDIDATES)
    assert scores["meteor"] is None and "java is not on PATH" in notes[0]
    assert scores["cider_d"] == pytest.approx(LIBRARY["cider_d"], rel=1e-12)


def test_box_iou_and_grounding_accuracy():
    target = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]])
    predicted = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5],
                              [0.5, 0.5, 0.6, 0.6]])
    iou = box_iou(predicted, target)
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 0.0]))
    assert grounding_accuracy(predicted, target) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="boxes must both be"):
        box_iou(predicted[:, :3], target[:, :3])


def test_vqa_accuracy_and_wups_without_wordnet():
    assert vqa_accuracy(["red", "two", "yes"], ["red", "three", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one length"):
        vqa_accuracy(["red"], [])
    value, why = wups(["red"], ["red"], 0.9)
    try:
        import nltk  # noqa: F401  (WUPS is computed only where WordNet is installed)
    except ImportError:
        assert value is None and "WordNet" in why

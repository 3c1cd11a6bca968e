"""Captioning, VQA and grounding on a tiny tokenizer's codes: exact questions and referring
expressions, tiny-data convergence, exact resume, the KV-cached decoder, JSONL folders and
clear errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lgvq.data import COLOUR_NAMES, SHAPE_NAMES
from lgvq.data.shapes.dataset import item_generator
from lgvq.data.shapes.rendering import object_masks
from lgvq.data.shapes.scenes import sample_scene
from lgvq.data.shapes.vocabulary import REGION_PHRASES, SIZE_NAMES
from lgvq.downstream.cli import main
from lgvq.downstream.evaluation import evaluate_task
from lgvq.downstream.tasks import DownstreamConfig, load_task_model, task_data, train_task
from lgvq.downstream.transformer import TransformerShape
from lgvq.downstream.understanding import (
    BOS,
    EOS,
    SPECIALS,
    CodeTextModel,
    _fitted_box,
    boxes_from_output,
    decode_captions,
    describe,
    scene_questions,
    scene_referring,
)
from tests.downstream.configs import assert_same_weights, task_config

TINY = {"width": 32, "layers": 1, "heads": 2, "batch_size": 8, "train_images": 16,
        "eval_images": 8, "log_every": 1, "checkpoint_every": 1000, "warmup_steps": 0,
        "device": "cpu", "text_length": 24, "beam_size": 2, "meteor": False}


def _config(tmp_path, task, **overrides):
    return task_config(TINY, tmp_path, task, **overrides)


def _matches(description: str, item) -> bool:
    """Does every attribute the description names hold for ``item``?"""
    words = description.split()
    for names, value in ((COLOUR_NAMES, item.colour), (SHAPE_NAMES, item.shape),
                         (SIZE_NAMES, item.size)):
        named = [w for w in words if w in names]
        if named and named != [value]:
            return False
    regions = [r for r, phrases in REGION_PHRASES.items() if description.endswith(phrases[0])]
    return not regions or regions == [item.region]


def _scenes(count):
    return [sample_scene(item_generator(0, "val", index)) for index in range(count)]


def test_descriptions_are_unambiguous_and_hide_the_asked_attribute():
    for scene in _scenes(60):
        for index, item in enumerate(scene.objects):
            for hide in ("", "colour", "shape", "size"):
                text = describe(scene, index, hide)
                assert [i for i, o in enumerate(scene.objects) if _matches(text, o)] == [index]
                if hide:
                    assert getattr(item, hide) not in text.split(), (text, hide)


def test_questions_have_exact_answers_and_a_fixed_draw():
    kinds = set()
    for index, scene in enumerate(_scenes(60)):
        questions = scene_questions(scene, "val", index, 4)
        assert questions == scene_questions(scene, "val", index, 4)  # seeded by (split, index)
        for question, answer, kind in questions:
            kinds.add(kind)
            if kind in ("colour", "shape", "size"):
                described = question.split(" is ", 1)[1]
                (item,) = [o for o in scene.objects if _matches(described, o)]
                assert answer == getattr(item, kind)
            elif question == "how many objects are there":
                assert answer == ("one", "two", "three")[len(scene.objects) - 1]
            elif kind == "count":
                shape = question.split()[2].rstrip("s").replace("crosse", "cross")
                count = sum(o.shape == shape for o in scene.objects)
                assert answer == ("zero", "one", "two", "three")[count]
            else:
                assert answer in ("yes", "no")
    assert kinds == {"colour", "shape", "size", "count", "relation"}
    scene = _scenes(1)[0]
    assert scene_questions(scene, "train", 0, 8) != scene_questions(scene, "val", 0, 8)


def test_referring_boxes_are_the_exact_mask_bounds():
    scene = _scenes(3)[2]
    masks = object_masks(scene, 32)
    for (text, box), mask, item in zip(scene_referring(scene, 32), masks, scene.objects):
        assert _matches(text, item)
        rows, columns = np.nonzero(mask)
        assert box == [columns.min() / 32, rows.min() / 32, (columns.max() + 1) / 32,
                       (rows.max() + 1) / 32]
        assert box[0] < item.centre_x < box[2] and box[1] < item.centre_y < box[3]


def test_pointer_box_head_reads_the_centre_off_the_code_cells():
    shape = TransformerShape(codebook_size=8, length=16, width=16, layers=1, heads=2,
                             causal=False)
    model = CodeTextModel(shape, 10, 4, 4, None, "learned", pointer=True)
    torch.testing.assert_close(model.cell_centres[[0, 5, 15]],
                               torch.tensor([[0.125, 0.125], [0.375, 0.375], [0.875, 0.875]]))
    torch.nn.init.zeros_(model.pointer.weight)
    torch.nn.init.zeros_(model.pointer.bias)  # no preference: the mean of all cell centres
    boxes = boxes_from_output(model(torch.zeros(3, 16, dtype=torch.long),
                                    torch.zeros(3, 4, dtype=torch.long)))
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, torch.full((3, 2), 0.5))


def _losses(folder):
    with open(folder / "metrics.csv", newline="") as stream:
        return [float(row["loss"]) for row in csv.DictReader(stream)]


@pytest.mark.parametrize("task", ["caption", "vqa", "ground"])
def test_each_task_converges_on_tiny_data_and_evaluates(tmp_path, tokenizer, task):
    # 8 images; grounding's box regression needs longer (measured: loss 3.5 -> 1.5 in 120 steps)
    config = _config(tmp_path, task, steps=120 if task == "ground" else 60, train_images=8,
                     learning_rate=3e-3)
    checkpoint = train_task(config, tokenizer=tokenizer, progress=False)
    losses = _losses(tmp_path / task)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses[::10]
    scores = evaluate_task(config, checkpoint, tokenizer)
    saved = json.loads((tmp_path / task / "metrics.json").read_text())
    assert saved["task"] == task and scores["heldout_loss"] > 0
    assert (tmp_path / task / "predictions.jsonl").read_text().count("\n") >= 8
    if task == "caption":
        assert {"greedy_cider_d", "beam_cider_d", "chance_cider_d", "chance_caption"} <= set(scores)
    elif task == "vqa":
        assert 0 <= scores["accuracy"] <= 1 and scores["chance_majority_answer"]
        assert 0 <= scores["chance_kind_prior_accuracy"] <= 1 and scores["wups_0.9"] is None
    else:
        assert {"accuracy_iou_0.5", "mean_iou", "chance_accuracy_iou_0.5"} <= set(scores)


def test_greedy_decoding_with_the_cache_is_the_uncached_argmax(tmp_path, tokenizer):
    config = _config(tmp_path, "caption", steps=3)
    checkpoint = train_task(config, tokenizer=tokenizer, progress=False)
    model = load_task_model(checkpoint, config, tokenizer, torch.device("cpu"))
    codes = task_data(config, tokenizer, "val").sequences[:3]
    decoded = decode_captions(model, codes, beam_size=1, max_tokens=6)
    for row, tokens in zip(codes, decoded):
        text = [BOS]
        for _ in range(6):  # the full forward pass each step, no cache
            logits = model(row[None], torch.tensor([text + [0]]))[0, -1]
            logits[:SPECIALS] = float("-inf")
            logits[EOS] = model(row[None], torch.tensor([text + [0]]))[0, -1, EOS]
            token = int(logits.argmax())
            if token == EOS:
                break
            text.append(token)
        assert tokens == text[1:]
    assert len(decode_captions(model, codes, beam_size=3, max_tokens=6)) == 3


def test_resume_continues_exactly(tmp_path, tokenizer):
    straight = _config(tmp_path / "a", "vqa", steps=4, dropout=0.1)
    train_task(straight, tokenizer=tokenizer, progress=False)
    first = _config(tmp_path / "b", "vqa", steps=2, dropout=0.1, checkpoint_every=2)
    train_task(first, tokenizer=tokenizer, progress=False)
    torch.manual_seed(123)  # a resumed process starts from another global RNG state
    resumed = _config(tmp_path / "b", "vqa", steps=4, dropout=0.1, resume=True)
    path = train_task(resumed, tokenizer=tokenizer, progress=False)
    assert_same_weights(tmp_path / "a" / "vqa" / "last.safetensors", path)


def _image_folder(folder, count=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):  # 48 x 32: the loaders centre-crop the width
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(
            folder / f"{index}.png")


def test_fitted_box_follows_the_resize_and_centre_crop():
    # a 48 x 32 image keeps columns 8..40; a box [8, 0, 16, 16] is the crop's left half-top
    assert _fitted_box([8, 0, 16, 16], (48, 32)) == [0.0, 0.0, 0.5, 0.5]
    assert _fitted_box([0, 8, 48, 8], (48, 32)) == [0.0, 0.25, 1.0, 0.5]  # clipped


def test_vqa_and_grounding_on_jsonl_folders(tmp_path, tiny_tokenizer, capsys):
    data = tmp_path / "data"
    _image_folder(data)
    answers = ["red", "blue", "two"]
    (data / "qa").mkdir()
    (data / "ref").mkdir()
    for split, images in (("train", range(4)), ("val", range(4, 6))):
        with open(data / "qa" / f"{split}.jsonl", "w") as qa, \
                open(data / "ref" / f"{split}.jsonl", "w") as ref:
            for index in images:  # image paths are relative to the folder
                qa.write(json.dumps({"image": f"../{index}.png", "question": "what is it",
                                     "answer": answers[index % 3]}) + "\n")
                ref.write(json.dumps({"image": f"../{index}.png", "expression": "the thing",
                                      "box": [8, 0, 16, 16]}) + "\n")
    common = ["--tokenizer", str(tiny_tokenizer), f"--cache_dir={tmp_path / 'cache'}",
              "--width=32", "--layers=1", "--heads=2", "--batch_size=4", "--steps=2",
              "--train_images=0", "--eval_images=0", "--device=cpu", "--text_length=8"]
    assert main(["vqa", f"--out_dir={tmp_path / 'vqa'}", f"--qa_folder={data / 'qa'}", *common]) == 0
    scores = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    assert scores["eval_examples"] == 2 and "accuracy_colour" not in scores
    assert main(["ground", f"--out_dir={tmp_path / 'ground'}", f"--ref_folder={data / 'ref'}",
                 *common]) == 0
    predictions = (tmp_path / "ground" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(predictions[0])["box"] == [0.0, 0.0, 0.5, 0.5]
    capsys.readouterr()
    assert main(["vqa", f"--out_dir={tmp_path / 'x'}", f"--qa_folder={tmp_path}",
                 *common]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--qa_folder:" in error and "train.jsonl not found" in error


def test_bad_understanding_options_are_clear_errors(tmp_path, tiny_tokenizer, capsys):
    with pytest.raises(ValueError, match="--text_vocab must be data or full"):
        DownstreamConfig.from_dict({"task": "caption", "text_vocab": "some"})
    with pytest.raises(ValueError, match="--qa_folder is for the vqa task, not ground"):
        DownstreamConfig.from_dict({"task": "ground", "qa_folder": str(tmp_path)})
    with pytest.raises(ValueError, match="--box_head must be pointer or regress"):
        DownstreamConfig.from_dict({"task": "ground", "box_head": "mlp"})
    with pytest.raises(ValueError, match="--beam_size must be >= 1"):
        DownstreamConfig.from_dict({"task": "caption", "beam_size": "0"})
    assert main(["caption", "--tokenizer", str(tmp_path / "missing.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--tokenizer: checkpoint not found" in error
    assert main(["ground", "--help"]) == 0
    assert "Acc@IoU>0.5" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process_on_the_whole_batch(tmp_path,
                                                                          tiny_tokenizer):
    """Data parallel with gloo, as `lgvq train`: 2 processes with 4 questions each train the VQA
    model like one process with the batch of 8 (the loss is a per-question mean, the gradients
    are averaged)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["downstream", "vqa", f"--tokenizer={tiny_tokenizer}", "--width=32", "--layers=1",
              "--heads=2", "--batch_size=8", "--train_images=16", "--eval_images=8",
              "--steps=4", "--checkpoint_every=2", "--device=cpu", "--threads=1",
              "--meteor=false", f"--cache_dir={tmp_path / 'cache'}"]
    subprocess.run([sys.executable, "-m", "lgvq", *common, f"--out_dir={tmp_path / 'one'}"],
                   check=True, env=env, cwd=root, timeout=600, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "lgvq", *common,
                    f"--out_dir={tmp_path / 'two'}"],
                   check=True, env=env, cwd=root, timeout=600, capture_output=True)
    one = load_file(str(tmp_path / "one" / "last.safetensors"))
    two = load_file(str(tmp_path / "two" / "last.safetensors"))
    weights = [k for k in one if k.startswith("model.") and one[k].is_floating_point()]
    assert weights and one.keys() == two.keys()
    difference = torch.cat([(two[k].double() - one[k].double()).abs().flatten()
                            for k in weights])
    # as in `lgvq train`'s test: Adam turns rounding noise in near-zero gradients into steps of
    # up to lr; unaveraged gradients (half the batch per rank) would move most weights apart
    assert float((difference <= 1e-5).double().mean()) > 0.99
    assert float(difference.max()) <= 2 * 1e-3 * 4
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["task"] == "vqa"
    rows = (tmp_path / "two" / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [4]

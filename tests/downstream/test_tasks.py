"""The generation tasks: each trains and evaluates on a tiny tokenizer's codes, resume is exact,
label maps are exact, bad options are clear errors."""

import json

import pytest
import torch

from lgvq.data import COLOUR_NAMES, SHAPE_NAMES
from lgvq.data.shapes.dataset import item_generator
from lgvq.data.shapes.scenes import sample_scene
from lgvq.downstream.evaluation import evaluate_task
from lgvq.downstream.tasks import DownstreamConfig, scene_label_grid, train_task
from tests.downstream.configs import assert_same_weights, task_config

TINY = {"width": 32, "layers": 1, "heads": 2, "batch_size": 4, "train_images": 16,
        "eval_images": 8, "samples": 4, "maskgit_steps": 2, "log_every": 1,
        "checkpoint_every": 2, "warmup_steps": 0, "device": "cpu"}


def _config(tmp_path, task, **overrides):
    return task_config(TINY, tmp_path, task, **overrides)


@pytest.mark.parametrize("task", ["generate", "complete", "t2i", "semantic"])
def test_each_task_trains_and_evaluates(tmp_path, tokenizer, task):
    config = _config(tmp_path, task, guidance_scale=1.0)
    checkpoint = train_task(config, tokenizer=tokenizer, progress=False)
    scores = evaluate_task(config, checkpoint, tokenizer)
    assert scores["heldout_loss"] > 0 and scores["generated"] == 4
    assert (tmp_path / task / "samples.png").is_file()
    assert json.loads((tmp_path / task / "metrics.json").read_text())["task"] == task
    assert "FID not computed: no --fid_weights given" in (tmp_path / task / "report.md").read_text()
    if task != "generate":  # the judge checks itself on the real renders
        assert scores["judge_real_colour"] == 1.0 and scores["judge_real_shape"] == 1.0
        assert 0 <= scores["judge_generated_object"] <= 1
    if task == "complete":
        assert scores["completion_rows"] == 4 and scores["completion_psnr_db"] > 0


def test_resume_continues_exactly(tmp_path, tokenizer):
    # t2i draws captions, masks and text dropout per step; dropout draws from the global RNG
    straight = _config(tmp_path / "a", "t2i", steps=4, dropout=0.1, condition_dropout=0.5)
    train_task(straight, tokenizer=tokenizer, progress=False)
    first = _config(tmp_path / "b", "t2i", steps=2, dropout=0.1, condition_dropout=0.5)
    train_task(first, tokenizer=tokenizer, progress=False)
    torch.manual_seed(123)  # a resumed process starts from another global RNG state
    resumed = _config(tmp_path / "b", "t2i", steps=4, dropout=0.1, condition_dropout=0.5,
                      resume=True)
    path = train_task(resumed, tokenizer=tokenizer, progress=False)
    assert_same_weights(tmp_path / "a" / "t2i" / "last.safetensors", path)
    rows = (tmp_path / "b" / "t2i" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    with pytest.raises(FileExistsError, match="--resume"):
        train_task(first, tokenizer=tokenizer, progress=False)


def test_label_grid_marks_each_object_with_its_colour_and_shape():
    scene = sample_scene(item_generator(0, "val", 3))
    labels = scene_label_grid(scene, 32, 8)
    expected = {1 + COLOUR_NAMES.index(o.colour) * len(SHAPE_NAMES) + SHAPE_NAMES.index(o.shape)
                for o in scene.objects}
    assert set(labels.unique().tolist()) == expected | {0}
    for item in scene.objects:  # the cell under each object's centre carries its class
        row, column = int(item.centre_y * 8), int(item.centre_x * 8)
        assert int(labels[row, column]) == (1 + COLOUR_NAMES.index(item.colour) * 5
                                            + SHAPE_NAMES.index(item.shape))


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--task must be one of"):
        DownstreamConfig.from_dict({"task": "painting"})
    with pytest.raises(ValueError, match="--steps expects an integer"):
        DownstreamConfig.from_dict({"steps": "many"})
    with pytest.raises(ValueError, match="unknown config keys: \\['stepz'\\]"):
        DownstreamConfig.from_dict({"stepz": "1"})
    with pytest.raises(ValueError, match="--label_maps and --label_classes go together"):
        DownstreamConfig.from_dict({"label_maps": str(tmp_path)})
    with pytest.raises(ValueError, match="--condition_dropout"):
        DownstreamConfig.from_dict({"condition_dropout": "1.5"})

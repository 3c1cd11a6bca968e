"""`lgvq downstream TASK`: --help per task, one-line errors, end-to-end on captioned shapes and
on a JSONL folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgvq.config import build_config
from lgvq.downstream.cli import main
from lgvq.training import train
from tests.test_demo import _write_jsonl_folder

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--width=32", "--layers=1", "--heads=2", "--batch_size=4", "--train_images=16",
        "--eval_images=8", "--samples=4", "--maskgit_steps=2", "--steps=2", "--log_every=1",
        "--device=cpu"]


@pytest.mark.parametrize("task", ["generate", "complete", "t2i", "semantic"])
def test_each_task_has_help(task, capsys):
    assert main([task, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"lgvq downstream {task} --tokenizer=CKPT" in text and "--steps=1000" in text


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["painting"]) == 2
    assert "unknown task 'painting'" in capsys.readouterr().err
    assert main(["generate", f"--out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("lgvq downstream generate: error: --tokenizer=CKPT "
                                               "is required (an `lgvq train` checkpoint)")
    assert main(["t2i", "--tokenizer", str(tmp_path / "missing.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--tokenizer: checkpoint not found" in error
    assert main(["complete", "--tokenizer=x", "--steps=zero"]) == 2
    assert "--steps expects an integer" in capsys.readouterr().err


def test_lgvq_dispatches_downstream():
    result = subprocess.run([sys.executable, "-m", "lgvq", "downstream", "t2i", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "MaskGIT" in result.stdout


def test_complete_from_the_command_line(tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "complete"
    assert main(["complete", "--tokenizer", str(tiny_tokenizer), f"--out_dir={out}",
                 f"--cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    assert "completion_psnr_db" in capsys.readouterr().out
    assert {"last.safetensors", "metrics.csv", "report.md", "samples.png"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.slow
def test_tasks_run_on_a_jsonl_folder(tmp_path, text_encoder, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl_folder(data)
    config = build_config("shapes-tiny", {
        "dataset": "jsonl", "data_root": str(data), "image_size": "16", "train_images": "0",
        "eval_images": "0", "steps": "2", "batch_size": "4", "checkpoint_every": "2",
        "sample_every": "2", "mask_words": "all", "out_dir": str(tmp_path / "tokenizer")})
    checkpoint = train(config, text_encoder=text_encoder, progress=False)
    common = ["--tokenizer", str(checkpoint), f"--cache_dir={tmp_path / 'cache'}", *TINY,
              "--train_images=0", "--eval_images=0"]
    for task in ("generate", "complete", "t2i", "caption"):  # caption: the folder's captions
        extra = ["--meteor=false", "--text_length=24"] if task == "caption" else []
        assert main([task, f"--out_dir={tmp_path / task}", *common, *extra]) == 0, task
        scores = json.loads((tmp_path / task / "metrics.json").read_text())
        assert scores["eval_images"] == 8 and "judge_real_colour" not in scores
    capsys.readouterr()
    assert main(["semantic", f"--out_dir={tmp_path / 'semantic'}", *common]) == 2
    assert "needs segmentation maps" in capsys.readouterr().err
    maps = tmp_path / "maps"
    for split in ("train", "val"):  # two classes: the left half 0, the right half 1
        (maps / split).mkdir(parents=True)
        for index in range(8):
            pixels = np.zeros((24, 24), np.uint8)
            pixels[:, 12:] = 1
            Image.fromarray(pixels).save(maps / split / f"{index}.png")
    assert main(["semantic", f"--out_dir={tmp_path / 'semantic'}", *common,
                 f"--label_maps={maps}", "--label_classes=2"]) == 0
    assert (tmp_path / "semantic" / "samples.png").is_file()

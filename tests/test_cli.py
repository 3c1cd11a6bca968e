"""The command line explains itself: --help lists every option with its type, default and
meaning; `lgvq presets` shows what each preset sets; mistakes are one line naming the option."""

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from lgvq.__main__ import main
from lgvq.config import TrainConfig, build_config


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_help_lists_every_option_with_type_default_and_description(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    lines = {line.split()[0].split("=")[0]: line for line in out.splitlines()
             if line.startswith("  --")}
    for field in dataclasses.fields(TrainConfig):
        line = lines[f"--{field.name}"]  # every option, described once in lgvq/config.py
        flag, description = line.split(maxsplit=1)
        assert description.split(" [default: ")[0].strip(), f"--{field.name} has no description"
        assert "[default: " in line
    assert lines["--steps"].split()[0] == "--steps=INT"
    # what a bare `lgvq train` runs: the shapes preset's value, not the dataclass default
    assert f"[default: {build_config('shapes').steps}]" in lines["--steps"]
    assert build_config("shapes").steps != TrainConfig().steps
    assert lines["--language_guidance"].split()[0] == "--language_guidance=true|false"
    assert "--- " not in out  # section rulers of config.py are not descriptions


def test_eval_help_and_option_errors_name_the_option(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "--images=INT" in out and "--out=TEXT" in out
    code, _, err = run(capsys, "eval", "run/last.safetensors", "--images=abc")
    assert code == 2 and err.strip() == "lgvq eval: error: --images expects INT, got 'abc'"
    code, _, err = run(capsys, "eval", "run/last.safetensors", "--foo=1")
    assert code == 2 and err.count("\n") == 1 and "unknown option --foo" in err


def test_presets_show_what_each_sets(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "A bare `lgvq train` runs --preset=shapes" in out
    tiny = out.split("--preset=shapes-tiny\n")[1].split("\n\n")[0]
    assert "  --code_dim=16" in tiny and "  --steps=30" in tiny


def test_unreadable_jsonl_data_set_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"image": f"missing{i}.png", "captions": ["a red square"]})
             for i in range(4)]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--preset=shapes-tiny", "--dataset=jsonl",
                       f"--data_root={data}", f"--out_dir={out_dir}", "--steps=1",
                       "--mask_words=all", "--threads=1")
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("lgvq train: error: JSONL manifest") and "Traceback" not in err
    assert "none of the 4 images could be read" in last
    assert not out_dir.exists()


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    code, _, err = run(capsys, "train", "--tensorboard", f"--out_dir={tmp_path / 'run'}")
    assert code == 2 and err.count("\n") == 1
    assert "--tensorboard needs the tensorboard package" in err
    assert not (tmp_path / "run").exists()


def test_tensorboard_mirror_logs_each_metrics_row_once(tmp_path, monkeypatch):
    from lgvq.__main__ import TensorBoardMirror

    scalars = []

    class SummaryWriter:  # records what torch.utils.tensorboard's writer would be given
        def __init__(self, folder):
            Path(folder).mkdir(exist_ok=True)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=SummaryWriter))
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,psnr\n5,0.5,10.0\n10,0.25,12.0\n")
    TensorBoardMirror(tmp_path, interval=60).close()
    assert scalars == [("train/loss", 0.5, 5), ("train/psnr", 10.0, 5),
                       ("train/loss", 0.25, 10), ("train/psnr", 12.0, 10)]
    resumed = TensorBoardMirror(tmp_path, interval=60)  # rows already mirrored are skipped
    metrics.write_text(metrics.read_text() + "15,0.125,13.0\n")  # the resumed run goes on
    resumed.close()
    assert scalars[4:] == [("train/loss", 0.125, 15), ("train/psnr", 13.0, 15)]


def test_probe_trains_fresh_heads_on_frozen_codes_and_refuses_tokenizer_changes(tmp_path, capsys):
    from safetensors.torch import load_file

    from lgvq.training import train

    out_dir = tmp_path / "run"
    config = build_config("shapes-tiny", {"steps": "2", "out_dir": str(out_dir),
                                          "checkpoint_every": "2", "eval_images": "16"})
    checkpoint = train(config, progress=False)
    before = load_file(str(checkpoint))
    code, out, _ = run(capsys, "probe", str(checkpoint), "--steps=3", "--captions_per_image=2",
                       "--eval_images=16", f"--out={tmp_path / 'probe.json'}")
    assert code == 0 and "recall_gap_one_word: " in out
    scores = json.loads((tmp_path / "probe.json").read_text())
    assert scores["probe_config"]["steps"] == 3 and scores["probe_config"]["captions_per_image"] == 2
    assert 0.0 <= scores["recall_at_1_one_word"] <= 1.0
    after = load_file(str(checkpoint))  # the checkpoint is only read
    assert all(before[k].equal(after[k]) for k in before)
    code, _, err = run(capsys, "probe", str(checkpoint), "--code_dim=8")
    assert code == 2 and err.count("\n") == 1 and "cannot set ['code_dim']" in err
    code, _, err = run(capsys, "probe", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no such file" in err
    code, out, _ = run(capsys, "probe", "--help")
    assert code == 0 and "captions_per_image" in out

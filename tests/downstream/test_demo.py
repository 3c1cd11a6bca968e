"""The downstream demo: every task on both codebooks, side by side, finished runs reused."""

import json
import shutil

import pytest

from lgvq.downstream.demo import METRICS, main, run_downstream_demo

TINY = {"width": "32", "layers": "1", "heads": "2", "batch_size": "4", "train_images": "16",
        "eval_images": "8", "samples": "4", "maskgit_steps": "2", "steps": "2",
        "log_every": "1", "checkpoint_every": "2", "device": "cpu", "meteor": "false",
        "text_length": "24"}


@pytest.mark.slow
def test_demo_trains_every_task_on_both_codebooks(tiny_tokenizer, tmp_path, capsys):
    tokenizers = tmp_path / "tokenizers"
    for prefix in ("baseline", "lgvq"):  # one tiny checkpoint stands in for both codebooks
        (tokenizers / f"{prefix}_seed0").mkdir(parents=True)
        shutil.copy(tiny_tokenizer, tokenizers / f"{prefix}_seed0" / "last.safetensors")
    out = tmp_path / "downstream"
    result = run_downstream_demo([0], tokenizers, out, dict(TINY),
                                 tasks=["generate", "t2i", "semantic", "caption", "vqa",
                                        "ground"], workers=1)
    report = (out / "report.md").read_text()
    for task, key, label, _ in METRICS:
        if key not in ("fid", "beam_meteor"):  # METEOR is off here (a JVM per score)
            assert label in report, label
    assert "FID not computed" in report
    assert set(result["scores"]["LG-VQ"]) == {"generate", "complete", "t2i", "semantic",
                                              "caption", "vqa", "ground"}
    # the same checkpoint on both sides: the same seed gives the same scores
    for task, runs in result["scores"]["LG-VQ"].items():
        base = result["scores"]["baseline"][task][0]
        assert runs[0]["heldout_loss"] == base["heldout_loss"], task
    assert (out / "training_curves.png").is_file()
    assert (out / "lgvq_seed0" / "generate" / "complete" / "samples.png").is_file()
    assert json.loads((out / "scores.json").read_text())["baseline"]["t2i"]
    capsys.readouterr()
    run_downstream_demo([0], tokenizers, out, dict(TINY), tasks=["generate"], workers=1)
    assert capsys.readouterr().out.count("reusing the finished run") == 2

    # LG-VQ's tokenizer retrained (another checkpoint, other codes): its finished run is
    # neither reused nor resumed but set aside; the baseline's is reused
    from lgvq.config import build_config
    from lgvq.training import train
    other = train(build_config("shapes-tiny", {"steps": 2, "train_images": 16, "batch_size": 4,
                                               "eval_images": 16, "checkpoint_every": 2,
                                               "seed": 1, "out_dir": str(tmp_path / "other")}),
                  progress=False)
    shutil.copy(other, tokenizers / "lgvq_seed0" / "last.safetensors")
    before = (out / "lgvq_seed0" / "generate" / "scores.json").read_text()
    run_downstream_demo([0], tokenizers, out, dict(TINY), tasks=["generate"], workers=1)
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 1
    assert "holds a run on another tokenizer's codes" in printed
    assert (out / "lgvq_seed0" / "generate.previous-1" / "scores.json").read_text() == before


def test_demo_rejects_unknown_tasks(capsys):
    assert main(["--tasks=generate,painting"]) == 2
    assert "--tasks: unknown ['painting']" in capsys.readouterr().err

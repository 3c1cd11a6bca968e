"""The main job (lgvq.demo): baseline and LG-VQ trained per seed, evaluated, side by side."""

import json

import pytest

from lgvq.demo import METRICS, run_demo

TINY = {"steps": "2", "train_images": "16", "eval_images": "16", "batch_size": "4",
        "base_channels": "8", "code_dim": "8", "codebook_size": "16", "log_every": "1",
        "checkpoint_every": "2", "sample_every": "2"}


@pytest.mark.slow
def test_demo_trains_both_models_in_two_workers_and_writes_the_table(tmp_path, capsys):
    result = run_demo([0], tmp_path, dict(TINY), workers=2, threads=1)
    for folder in ("baseline_seed0", "lgvq_seed0"):
        scores = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert scores["steps"] == 2 and scores["images"] == 16
        for key, _, _ in METRICS:
            assert key in scores
        assert (tmp_path / folder / "eval_reconstruction.png").is_file()
    report = (tmp_path / "report.md").read_text()
    for _, label, _ in METRICS:
        assert label in report
    assert (tmp_path / "training_curves.png").is_file()
    assert [len(v) for v in result["scores"].values()] == [1, 1]

    # a second call reuses the finished runs instead of training again
    capsys.readouterr()
    run_demo([0], tmp_path, dict(TINY), workers=1, threads=1)
    assert capsys.readouterr().out.count("reusing the finished run") == 2

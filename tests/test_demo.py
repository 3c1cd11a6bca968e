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

    # a changed config (here: the heads') neither resumes nor overwrites the finished runs:
    # they move aside and the new ones train from step 0
    before = (tmp_path / "lgvq_seed0" / "metrics.json").read_text()
    run_demo([0], tmp_path, dict(TINY, decoder_layers="3"), workers=1, threads=1)
    out = capsys.readouterr().out
    assert out.count("holds a run of another config (--decoder_layers=3 differs") == 2
    assert (tmp_path / "lgvq_seed0.previous-1" / "metrics.json").read_text() == before
    scores = json.loads((tmp_path / "lgvq_seed0" / "metrics.json").read_text())
    assert scores["config"]["decoder_layers"] == 3 and scores["steps"] == 2


def _write_jsonl_folder(folder, count=8):
    """A tiny captioned image folder: coloured squares on grey, train.jsonl and val.jsonl."""
    import numpy as np
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        lines = []
        for index in range(count):
            name = list(colours)[index % len(colours)]
            pixels = np.full((24, 24, 3), 200, np.uint8)
            top, left = rng.integers(0, 12, size=2)
            pixels[top:top + 10, left:left + 10] = colours[name]
            path = folder / f"{split}_{index}.png"
            Image.fromarray(pixels).save(path)
            lines.append(json.dumps({"image": path.name,
                                     "captions": [f"a {name} square on grey",
                                                  f"one {name} block"]}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_demo_runs_on_a_jsonl_folder_and_names_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl_folder(data)
    out = tmp_path / "demo"
    run_demo([0], out, {**TINY, "dataset": "jsonl", "data_root": str(data), "image_size": "16"},
             workers=1, threads=1)
    report = (out / "report.md").read_text()
    assert f"jsonl data set at {data}" in report
    assert "captioned shapes" not in report
    scores = json.loads((out / "lgvq_seed0" / "metrics.json").read_text())
    assert scores["images"] == 8 and scores["config"]["mask_words"] == "all"
    assert "colour_fidelity" not in scores  # the attribute judge needs captioned shapes

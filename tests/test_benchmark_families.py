"""The benchmark families for LG-VQ run end to end (their quick sets, one repeat): a benchmark
that cannot run is a bug found here, not on the GPU machine."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_relation_and_lgvq_step_families_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--ops", "relation", "lgvq_step",
         "--repeats", "1", "--no-save", "--no-memory", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "official code's loop over word positions" in out and "lgvq native" in out
    assert "LG-VQ step <= 1.5x the step without language losses (shapes B16)" in out
    assert "fused op faster than the official code's per-word loop" in out


def _row(provider: str, median_s: float | None, status: str = "ok"):
    from benchmarks import harness

    return harness.Row(run_id="r", date="d", op="op", provider=provider, provider_label=provider,
                       shape="4x4x4", shape_json="{}", dtype="float32", device_type="cpu",
                       status=status, note="" if status == "ok" else "it broke",
                       median_s=median_s)


def test_shape_formats_read_the_command_line_and_label_tables():
    from benchmarks import harness

    families = harness.discover()
    nearest, quantizer = families["nearest_code"], families["quantizer"]
    relation, step = families["relation"], families["lgvq_step"]
    cosine = {"N": 8192, "K": 16384, "D": 8, "metric": "cosine"}
    assert nearest.parse_shape("8192x16384x8:cosine") == cosine
    assert nearest.parse_shape(" 8192×16384×8 : cosine ") == cosine
    assert nearest.parse_shape("N=8192,K=16384,D=8,metric=cosine") == cosine
    assert nearest.parse_shape("16384x16384x256") == {"N": 16384, "K": 16384, "D": 256,
                                                      "metric": "l2"}
    assert nearest.shape_label(cosine) == "8192x16384x8 cosine"
    assert nearest.shape_label({"N": 1, "K": 2, "D": 3, "metric": "l2"}) == "1x2x3"
    assert quantizer.parse_shape("4096x512x64") == {"N": 4096, "K": 512, "D": 64,
                                                    "mode": "train"}
    assert quantizer.shape_label({"N": 4096, "K": 512, "D": 64}) == "4096x512x64 train"
    assert relation.parse_shape("8x30x256x512") == {"B": 8, "L": 30, "M": 256, "C": 512}
    assert relation.shape_label({"B": 8, "L": 30, "M": 256, "C": 512}) == "B8 L30 M256 C512"
    assert step.parse_shape("paper:2") == {"model": "paper", "B": 2}
    assert step.shape_label({"model": "paper", "B": 2}) == "paper B2"
    for bad in ("16384x16384", "8x8x8:dot", "N=1,K=2", "N=1,K=2,D=x", "N=1,K=2,D=3,Q=4"):
        with pytest.raises(ValueError):
            nearest.parse_shape(bad)
    with pytest.raises(ValueError):
        step.parse_shape("huge:4")
    for family in families.values():  # every committed shape has a label of its own
        for shapes in family.shape_sets.values():
            labels = [family.shape_label(shape) for shape in shapes]
            assert len(set(labels)) == len(labels), (family.name, labels)


def test_ratio_target_judges_the_medians_and_names_what_is_missing():
    from benchmarks import harness

    case = {"slow": _row("slow", 0.004), "fast": _row("fast", 0.001)}
    met = harness.ratio_target("fast is 3x faster", case, "slow", "fast", at_least=3)
    assert met.status == "MET" and met.detail.startswith("4.00x (slow 4 ms / fast 1 ms")
    assert harness.ratio_target("d", case, "slow", "fast", at_most=2).status == "NOT MET"
    missing = harness.ratio_target("d", {"slow": case["slow"]}, "slow", "fast", at_least=1,
                                   where="4x4x4 float32")
    assert missing.status == "NOT MEASURED"
    assert missing.detail == "fast at 4x4x4 float32 not in this run"
    failed = harness.ratio_target("d", {**case, "fast": _row("fast", None, "error")}, "slow",
                                  "fast", at_least=1)
    assert (failed.status, failed.detail) == ("NOT MEASURED", "fast error: it broke")


def test_official_loop_baseline_computes_the_relation_loss():
    """The relation benchmark's official-code loop times the same loss and gradient as the op."""
    import torch

    import lgvq_kernels
    from benchmarks import relation

    shape = {"B": 3, "L": 7, "M": 5, "C": 8}
    step = relation.official_loop(shape, torch.device("cpu"), "float32")
    loss = step()
    words, visual, codes, mask = relation.make_inputs(shape, torch.device("cpu"), "float32")
    codes.requires_grad_(True)
    expected = lgvq_kernels.relation_alignment_loss(words, visual, codes, mask,
                                                    backend="reference").loss
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_time_functions_interleaves_the_candidates_and_isolates_a_failure():
    import torch

    from benchmarks import harness

    calls = []

    def broken():
        calls.append("broken")
        if len([c for c in calls if c == "broken"]) > 2:  # fails in the timed samples
            raise RuntimeError("it broke")

    config = harness.TimingConfig(repeats=4, warmup=1, warmup_s=0.0, min_sample_s=0.0)
    results = harness.time_functions({"a": lambda: calls.append("a"),
                                      "b": lambda: calls.append("b"), "broken": broken},
                                     torch.device("cpu"), config)
    assert isinstance(results["broken"], RuntimeError)
    assert results["a"].repeats == results["b"].repeats == 4
    timed = [c for c in calls[calls.index("broken", calls.index("broken") + 1) + 1:]
             if c != "broken"]
    assert timed == ["a", "b"] * 4  # one sample of each in turn, not all of a then all of b


def test_every_shape_target_judges_the_worst_shape():
    from benchmarks import harness

    rows = []
    for shape, base, mine in (("1x2x3", 0.002, 0.001), ("4x5x6", 0.002, 0.004)):
        for provider, median in (("base", base), ("mine", mine)):
            row = _row(provider, median)
            row.shape, row.shape_json = shape, f'{{"N": {shape[0]}}}'
            rows.append(row)
    target = harness.every_shape_target("d", rows, "base", "mine", at_least=1.0)
    assert target.status == "NOT MET" and target.detail.startswith("worst 0.50x at 4x5x6")
    only_first = harness.every_shape_target("d", rows, "base", "mine", at_least=1.0,
                                            applies=lambda shape: shape["N"] == 1)
    assert only_first.status == "MET" and "over 1 shape(s)" in only_first.detail


def test_speedup_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import harness, report

    family = harness.get_family("nearest_code")
    rows = []
    for shape, base, mine in (({"N": 8, "K": 4, "D": 2, "metric": "l2"}, 2.0, 1.0),
                              ({"N": 8, "K": 4, "D": 2, "metric": "cosine"}, 2.0, 4.0)):
        for provider, median in (("torch-addmm-argmin", base), ("lgvq-native", mine)):
            row = _row(provider, median)
            row.shape = family.shape_label(shape)
            row.shape_json = __import__("json").dumps(shape, sort_keys=True)
            rows.append(row)
    path = tmp_path / "speedup.png"
    assert report.speedup_plot(family, rows, str(path), "title") is None
    assert path.stat().st_size > 0


def test_two_runs_in_a_day_keep_their_own_plots(tmp_path):
    # The second run of a day appends its section to the same markdown file: its plots must
    # not overwrite the first run's, which the first section still shows.
    command = [sys.executable, "-m", "benchmarks.report", "--ops", "nearest_code", "--shapes",
               "8x16x4", "--providers", "lgvq-reference", "torch-addmm-argmin", "--repeats",
               "1", "--no-memory", "--threads", "1", "--out", str(tmp_path)]
    for _ in range(2):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (markdown,) = tmp_path.glob("*_nearest_code_*.md")
    text = markdown.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert text.count("## nearest_code") == 2 and len(images) == 4
    assert len(set(images)) == 4, images
    for name in images:
        assert (tmp_path / name).stat().st_size > 0, name


def test_memory_column_counts_the_reference_kept_score_buffer():
    # The reference search keeps its score buffer between calls on CPU; the memory worker
    # measures a call after a warm-up call, so it must free that buffer first or the column
    # would read ~0 for a call that holds 4 MiB (1024 x 1024 float32 scores).
    if not sys.platform.startswith("linux"):
        pytest.skip("the VmHWM memory method is Linux-only")
    from benchmarks.harness.memory import MemoryWorker

    worker = MemoryWorker()
    try:
        extra, note = worker.measure("nearest_code", "lgvq-reference",
                                     {"N": 1024, "K": 1024, "D": 8, "metric": "l2"}, "float32")
    finally:
        worker.close()
    assert extra is not None, note
    assert extra >= 3.5 * 2**20, f"{extra / 2**20:.2f} MiB: the kept 4 MiB buffer went uncounted"

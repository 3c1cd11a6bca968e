"""The benchmark families for LG-VQ run end to end (their quick sets, one repeat): a benchmark
that cannot run is a bug found here, not on the GPU machine."""

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

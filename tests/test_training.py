"""Training loop: config parsing, atomic checkpoints, exact resume after kill -9, CLI errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from lgvq.config import build_config, parse_overrides
from lgvq.quantizers import TamingVectorQuantizer, VectorQuantizer
from lgvq.training import batch_indices, build_backbone

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_unknown_keys_rejected():
    config = build_config("shapes", parse_overrides(
        ["--steps=12", "--resume", "--channel_multipliers=1,2,2", "--alpha=0.5"]))
    assert (config.steps, config.resume, config.channel_multipliers, config.alpha) == \
        (12, True, (1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="unknown config keys: \\['stepz'\\]"):
        build_config("shapes", {"stepz": "1"})
    with pytest.raises(ValueError, match="--steps expects an integer"):
        build_config("shapes", {"steps": "ten"})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("imagenet")
    with pytest.raises(ValueError, match="expected --key=value"):
        parse_overrides(["steps=3"])


def test_batch_order_is_a_function_of_seed_and_step():
    first = [batch_indices(0, s, 8, 20) for s in range(5)]
    again = [batch_indices(0, s, 8, 20) for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # every epoch visits every image once (40 indices over 2 epochs of 20, across a wrap)
    counts = torch.bincount(torch.cat(first), minlength=20)
    assert bool((counts == 2).all())
    assert not torch.equal(batch_indices(1, 0, 8, 20), first[0])


@pytest.mark.parametrize("preset", ["cub", "celeba", "coco"])
def test_paper_presets_train_the_codebook_like_the_official_lgvq_code(preset):
    """LG-VQ's official code quantizes with taming's VectorQuantizer2 (legacy=True, beta=0.25):
    loss = |x - sg(e)|^2 + 0.25 |sg(x) - e|^2, a learnable codebook, no EMA. The paper presets
    must build that quantizer (commitment 1.0, codebook 0.25), not the VQ-VAE weighting."""
    small = {"image_size": "32", "base_channels": "8", "channel_multipliers": "1,2",
             "res_blocks": "1", "code_dim": "8", "codebook_size": "16", "backbone": "vqvae"}
    quantizer = build_backbone(build_config(preset, small)).model.quantizer
    assert isinstance(quantizer, VectorQuantizer)
    assert quantizer.learnable_codebook and not quantizer.ema_update
    assert (quantizer.commitment_weight, quantizer.codebook_weight) == (1.0, 0.25)

    # the same gradients as taming's quantizer on the same codebook and input
    taming = TamingVectorQuantizer(16, 8, beta=0.25, legacy=True, backend="reference")
    with torch.no_grad():
        taming.embedding.weight.copy_(quantizer.codebook)
    features = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    ours_input = features.clone().requires_grad_()
    theirs_input = features.clone().requires_grad_()
    quantizer.backend = "reference"
    quantizer(ours_input.flatten(2).transpose(1, 2))[2].backward()
    taming(theirs_input)[1].backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad)
    torch.testing.assert_close(quantizer.codebooks.grad[0], taming.embedding.weight.grad)


def test_checkpoint_round_trip_and_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model=model, optimizers={"model": optimizer}, step=7,
                    config={"steps": 9})
    assert read_checkpoint_metadata(path)["step"] == 7
    good = path.read_bytes()

    import lgvq.checkpoint as checkpoint_module

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, optimizers={"model": optimizer}, step=8, config={})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]

    other = torch.nn.Linear(4, 3)
    other_optimizer = torch.optim.Adam(other.parameters(), lr=0.1)
    meta = load_checkpoint(path, model=other, optimizers={"model": other_optimizer})
    assert meta["step"] == 7 and meta["config"] == {"steps": 9}
    assert torch.equal(other.weight, model.weight)
    state, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], loaded[0]["exp_avg"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", model=other)


def _train_command(out_dir, *extra):
    return [sys.executable, "-m", "lgvq", "train", "--preset=shapes-tiny", f"--out_dir={out_dir}",
            "--steps=24", "--checkpoint_every=4", "--threads=1", *extra]


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim."))}


@pytest.mark.slow
def test_kill_nine_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_command(straight), check=True, env=env, cwd=ROOT, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(killed), env=env, cwd=ROOT)
    checkpoint = killed / "last.safetensors"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and read_checkpoint_metadata(checkpoint)["step"] >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    step_at_kill = read_checkpoint_metadata(checkpoint)["step"]
    assert 8 <= step_at_kill < 24
    subprocess.run(_train_command(killed, "--resume"), check=True, env=env, cwd=ROOT, timeout=600)

    expected, got = _tensors(straight / "last.safetensors"), _tensors(checkpoint)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    rows = (killed / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [5, 10, 15, 20, 24]


def test_cli_reports_bad_arguments_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "lgvq", "train", "--stepz=1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "unknown config keys: ['stepz']" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "lgvq", "eval", "/no/such/file"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "/no/such/file" in result.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process_on_the_whole_batch(tmp_path):
    """Data parallel with gloo: 2 processes with 4 images each train the baseline tokenizer like
    one process with the batch of 8: its losses are per-image means and the gradients are
    averaged. (A learnable codebook: k-means init and dead-code re-seeding sample rows of the
    local batch, so with the EMA quantizer the runs legitimately differ.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--steps=6", "--checkpoint_every=3", "--language_guidance=false",
              "--quantizer=learnable"]
    single = tmp_path / "single"
    subprocess.run(_train_command(single, *common), check=True, env=env, cwd=ROOT, timeout=600)
    parallel = tmp_path / "parallel"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "lgvq", "train", "--preset=shapes-tiny",
                f"--out_dir={parallel}", "--threads=1", *common]
    subprocess.run(launcher, check=True, env=env, cwd=ROOT, timeout=600)

    assert read_checkpoint_metadata(parallel / "last.safetensors")["step"] == 6
    one, two = _tensors(single / "last.safetensors"), _tensors(parallel / "last.safetensors")
    assert one.keys() == two.keys()
    tokenizer = [k for k in one if k.startswith("model.tokenizer.") and one[k].is_floating_point()]
    assert tokenizer
    difference = torch.cat([(two[k].double() - one[k].double()).abs().flatten()
                            for k in tokenizer])
    # Adam turns float-rounding noise in (near-)zero gradients (conv biases before GroupNorm)
    # into steps of up to lr, so a few weights differ by <= lr * steps; gradients that were not
    # averaged (half the batch per rank) would move almost every weight differently.
    assert float((difference <= 1e-5).double().mean()) > 0.99
    assert float(difference.max()) <= 2 * 4e-4 * 6
    rows = (parallel / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [5, 6]


@pytest.mark.slow
def test_vqgan_backbone_trains_its_discriminator_and_resumes(tmp_path):
    """backbone=vqgan: the PatchGAN starts at disc_start, is checkpointed with its optimizer, a
    resumed run continues bit for bit; without LPIPS weights the run warns and goes on."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    common = ["--backbone=vqgan", "--disc_start=3", "--disc_channels=8", "--disc_layers=2",
              "--log_every=1", "--steps=6", "--checkpoint_every=2"]
    straight = tmp_path / "straight"
    result = subprocess.run(_train_command(straight, *common), env=env, cwd=ROOT, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LPIPS weights not found" in result.stderr
    tensors = _tensors(straight / "last.safetensors")
    assert any(k.startswith("optim.discriminator.") for k in tensors)
    from safetensors.torch import load_file

    saved = load_file(str(straight / "last.safetensors"))
    assert any(k.startswith("module.discriminator.") for k in saved)
    rows = (straight / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    table = [dict(zip(header, row.split(","))) for row in rows[1:]]
    assert [int(row["step"]) for row in table] == [1, 2, 3, 4, 5, 6]
    for row in table[:3]:  # steps 0-2: before disc_start
        assert float(row["discriminator"]) == 0.0 and float(row["adaptive_weight"]) == 0.0
    for row in table[3:]:
        assert float(row["discriminator"]) > 0.0 and float(row["adaptive_weight"]) > 0.0

    resumed = tmp_path / "resumed"
    subprocess.run(_train_command(resumed, *common[:-2], "--steps=4", "--checkpoint_every=2"),
                   check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    subprocess.run(_train_command(resumed, *common, "--resume"), check=True, env=env, cwd=ROOT,
                   timeout=600, capture_output=True)
    got = _tensors(resumed / "last.safetensors")
    different = [k for k in tensors if not torch.equal(tensors[k], got[k])]
    assert not different, f"resumed vqgan run differs in {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["cvq", "learnable"])
def test_other_quantizers_train_and_evaluate(tmp_path, quantizer):
    """--quantizer=cvq (online clustered) and learnable (taming-style) run through the loop and
    through `lgvq eval`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = tmp_path / quantizer
    subprocess.run(_train_command(out, f"--quantizer={quantizer}", "--steps=3",
                                  "--eval_images=16"),
                   check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "lgvq", "eval", str(out / "last.safetensors")],
                            env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    scores = json.loads((out / "metrics.json").read_text())
    assert scores["step"] == 3 and scores["images"] == 16
    assert 0.0 < scores["codebook_usage"] <= 1.0 and scores["psnr_db"] > 0


# a run that sends itself SIGINT while step 2 loads its batch, as Ctrl-C would
_INTERRUPT_AT_STEP_2 = """
import os, signal, sys
import lgvq.training as training
from lgvq.__main__ import main
load_batch = training.load_batch
def interrupting(dataset, config, step):
    if step == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return load_batch(dataset, config, step)
training.load_batch = interrupting
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigint_saves_the_step_and_a_bare_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    common = ["--preset=shapes-tiny", "--steps=5", "--checkpoint_every=100", "--log_every=1",
              "--threads=1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "lgvq", "train", f"--out_dir={straight}", *common],
                   check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    result = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_STEP_2, "train",
                             f"--out_dir={cut}", *common], env=env, cwd=ROOT, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "lgvq train: interrupted after step 3/5; checkpoint written to")
    assert read_checkpoint_metadata(cut / "last.safetensors")["step"] == 3
    # the README's form: the stored config, nothing retyped
    subprocess.run([sys.executable, "-m", "lgvq", "train", f"--out_dir={cut}", "--resume"],
                   check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)

    expected, got = (load_file(str(folder / "last.safetensors")) for folder in (straight, cut))
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    configs = [read_checkpoint_metadata(folder / "last.safetensors")["config"]
               for folder in (straight, cut)]
    for config in configs:
        del config["out_dir"], config["resume"]
    assert configs[0] == configs[1]
    rows = (cut / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5]
    umask = os.umask(0)
    os.umask(umask)
    for written in (cut / "last.safetensors", cut / "reconstruction_000005.png"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written  # not mkstemp's 0600


def _fake_run(folder, **config):
    """A checkpoint holding ``config`` (the shapes preset's, with changes): enough for
    resume_config, which reads only the metadata."""
    values = {**build_config("shapes").to_dict(), "out_dir": str(folder), **config}
    save_checkpoint(folder / "last.safetensors", model=torch.nn.Linear(1, 1), optimizers={},
                    step=3, config=values)


def test_resume_takes_the_stored_config_and_allows_only_safe_changes(tmp_path):
    from lgvq.training import resume_config

    _fake_run(tmp_path, language_guidance=False, code_dim=8, preset="shapes-tiny")
    config = resume_config(tmp_path, {"steps": "50", "log_every": "2", "threads": "1"})
    assert (config.language_guidance, config.code_dim, config.steps, config.log_every,
            config.resume, config.preset) == (False, 8, 50, 2, True, "shapes-tiny")
    assert resume_config(tmp_path, {"code_dim": "8"}).code_dim == 8  # retyped, unchanged
    with pytest.raises(ValueError, match=r"--language_guidance=true differs from the run being "
                                         r"resumed \(--language_guidance=false\)"):
        resume_config(tmp_path, {"language_guidance": "true"})
    with pytest.raises(ValueError, match="--preset=shapes differs"):
        resume_config(tmp_path, {"preset": "shapes"})
    with pytest.raises(FileNotFoundError, match="--resume: nothing to resume"):
        resume_config(tmp_path / "empty")


def test_a_checkpoint_older_than_an_option_resumes_only_with_its_default(tmp_path):
    from lgvq.training import check_resumable

    stored = {**build_config("shapes").to_dict(), "out_dir": str(tmp_path)}
    del stored["decoder_layers"]  # written before the option existed: the default's behaviour
    check_resumable(stored, build_config("shapes", {"out_dir": str(tmp_path),
                                                    "decoder_layers": "2"}))
    with pytest.raises(ValueError, match=r"--decoder_layers=1 differs from the run being "
                                         r"resumed \(--decoder_layers=2\)"):
        check_resumable(stored, build_config("shapes", {"out_dir": str(tmp_path),
                                                        "decoder_layers": "1"}))


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    from lgvq.__main__ import main

    # --steps=1: before the fix this silently trained a new run
    assert main(["train", f"--out_dir={tmp_path / 'missing'}", "--resume", "--steps=1"]) == 2
    assert not (tmp_path / "missing").exists()
    _fake_run(tmp_path)
    assert main(["train", f"--out_dir={tmp_path}", "--resume", "--batch_size=3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 1 and "--batch_size=3 differs" in error.splitlines()[-1]

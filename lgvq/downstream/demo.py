"""The downstream demo (`python -m lgvq.downstream.demo`): every generation and understanding
task trained on the baseline's and on LG-VQ's codes with the same seed and budget, side by
side, with the chance level of each understanding task beside it (the paper's Tables 8, 9, 11).

  python -m lgvq.downstream.demo [--seeds=0,1,2] [--steps=500 | --budget_minutes=M]
      [--tokenizers=runs/demo] [--out_dir=runs/downstream] [--workers=2]
      [--threads_per_worker=1] [--tasks=generate,t2i,semantic,caption,vqa,ground]
      [--key=value ...]

The tokenizers are runs/demo/{baseline,lgvq}_seed{S}/last.safetensors (`make demo`); the
missing ones are trained first with ``lgvq.demo`` (its own budget, not counted here). Other
--key=value pairs are ``DownstreamConfig`` overrides. Completion is scored on the unconditional
model (taming's setting: one causal model generates and completes), so ``generate`` trains once
per codebook and seed and is evaluated twice.

Budget: every task trains DEFAULT_STEPS (500) steps unless --steps says otherwise, so the same
seeds give the same figures on any machine; on 2 idle cores the whole demo then takes about 20
minutes. With --budget_minutes (and no --steps) one step of each task's model is timed on the
first tokenizer's codes instead, and the step count is set so that training fills 70% of the
budget across the workers (figures then depend on the machine's speed and load); the report
gives the measured wall time.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

from lgvq.checkpoint import read_checkpoint_metadata
from lgvq.config import parse_overrides
from lgvq.downstream.codes import load_tokenizer
from lgvq.downstream.evaluation import evaluate_task
from lgvq.downstream.tasks import (
    CHECKPOINT_NAME,
    DownstreamConfig,
    build_optimizer,
    build_task_model,
    task_data,
    task_loss,
    train_task,
)
from lgvq.evaluation.report import mean_and_std, write_markdown_report
from lgvq.files import atomic_path, atomic_write, set_aside

CODEBOOKS = (("baseline", "baseline"), ("LG-VQ", "lgvq"))  # (label, run-folder prefix)
DEMO_DEFAULTS = {"width": 96, "layers": 2, "heads": 4, "batch_size": 32, "train_images": 1024,
                 "eval_images": 128, "samples": 128, "log_every": 25, "checkpoint_every": 100,
                 "warmup_steps": 20, "guidance_scale": 1.0}
# (task of the scores, key, label, higher is better; None = a control or a ceiling)
METRICS = [
    ("generate", "heldout_loss", "unconditional: held-out NLL per code (nats)", False),
    ("generate", "generated_distinct_codes", "  distinct codes in the samples", None),
    ("generate", "fid", "unconditional: FID", False),
    ("complete", "completion_psnr_db", "completion: PSNR of the completed lower half (dB)", True),
    ("complete", "reconstruction_lower_psnr_db",
     "  ceiling: the tokenizer's reconstruction of the true codes (dB)", None),
    ("complete", "judge_generated_object",
     "completion: objects centred in the completed rows right (colour and shape)", True),
    ("t2i", "heldout_loss", "text-to-image: held-out masked-code NLL (nats)", False),
    ("t2i", "judge_generated_colour", "text-to-image: judge colour accuracy", True),
    ("t2i", "judge_generated_shape", "text-to-image: judge shape accuracy", True),
    ("t2i", "judge_generated_object", "text-to-image: objects right (colour and shape)", True),
    ("t2i", "judge_reconstructed_object", "  ceiling: the same on reconstructions", None),
    ("t2i", "judge_real_object", "  the judge on real renders (its own check)", None),
    ("semantic", "heldout_loss", "semantic synthesis: held-out NLL per code (nats)", False),
    ("semantic", "judge_generated_colour", "semantic synthesis: judge colour accuracy", True),
    ("semantic", "judge_generated_shape", "semantic synthesis: judge shape accuracy", True),
    ("semantic", "judge_generated_object", "semantic synthesis: objects right", True),
    ("semantic", "judge_reconstructed_object", "  ceiling: the same on reconstructions", None),
    # the understanding tasks: the paper's Tables 11 (captioning), 9 (VQA), 8 (grounding)
    ("caption", "beam_cider_d", "Table 11 captioning: CIDEr-D (beam search)", True),
    ("caption", "greedy_cider_d", "  CIDEr-D (greedy)", True),
    ("caption", "beam_bleu4", "  BLEU-4 (beam)", True),
    ("caption", "beam_rouge_l", "  ROUGE-L (beam)", True),
    ("caption", "beam_meteor", "  METEOR (beam)", True),
    ("caption", "chance_cider_d", "  chance: the most frequent training caption, CIDEr-D", None),
    ("caption", "heldout_loss", "  held-out NLL per caption token (nats)", False),
    ("vqa", "accuracy", "Table 9 VQA: accuracy", True),
    ("vqa", "chance_accuracy", "  chance: the majority answer", None),
    ("vqa", "chance_kind_prior_accuracy", "  chance: the majority answer per question kind", None),
    ("vqa", "accuracy_colour", "  accuracy on colour questions", True),
    ("vqa", "accuracy_shape", "  accuracy on shape questions", True),
    ("vqa", "accuracy_size", "  accuracy on size questions", True),
    ("vqa", "accuracy_count", "  accuracy on count questions", True),
    ("vqa", "accuracy_relation", "  accuracy on left/right/above/below questions", True),
    ("ground", "accuracy_iou_0.5", "Table 8 grounding: Acc@IoU>0.5", True),
    ("ground", "mean_iou", "  mean IoU", True),
    ("ground", "chance_accuracy_iou_0.5", "  chance: the mean training box, Acc@IoU>0.5", None),
]
ALL_TASKS = ("generate", "t2i", "semantic", "caption", "vqa", "ground")
# steps per task run without --steps: fixed, so that a seed's figures do not depend on the
# machine's load; at 887 steps the six tasks took 8.2 min per codebook and seed on 2 idle cores
# (2 workers x 1 thread), so 500 keeps the 36 runs and their evaluation within 20 minutes
DEFAULT_STEPS = 500
_WORKER = {}


def tokenizer_path(folder: Path, prefix: str, seed: int) -> Path:
    return folder / f"{prefix}_seed{seed}" / "last.safetensors"


def ensure_tokenizers(folder: Path, seeds: list[int], workers: int, threads: int) -> None:
    """Train (``lgvq.demo.run_demo``) the tokenizers of the seeds that lack one."""
    missing = [s for s in seeds if not all(tokenizer_path(folder, p, s).is_file()
                                           for _, p in CODEBOOKS)]
    if missing:
        from lgvq.demo import run_demo

        print(f"[downstream] no tokenizers for seeds {missing} in {folder}: training them with "
              "lgvq.demo first", flush=True)
        run_demo(missing, folder, {}, workers=workers, threads=threads)


def _config(task: str, tokenizer: Path, out_dir: Path, seed: int, overrides: dict,
            **extra) -> DownstreamConfig:
    values = {**DEMO_DEFAULTS, **overrides, "task": task, "tokenizer": str(tokenizer),
              "out_dir": str(out_dir), "seed": seed, **extra}
    return DownstreamConfig.from_dict(values)


def seconds_per_step(tasks: list[str], tokenizer_file: Path, overrides: dict) -> dict:
    """Seconds of one training step of each task's model (mean of 3 after one warm-up)."""
    tokenizer = load_tokenizer(tokenizer_file)
    timings = {}
    for task in tasks:
        config = _config(task, tokenizer_file, Path("unused"), 0, overrides)
        data = task_data(config, tokenizer, "train")
        torch.manual_seed(0)
        model = build_task_model(config, tokenizer)
        optimizer = build_optimizer(config, model)
        for step in range(4):
            if step == 1:
                started = time.perf_counter()
            rows = torch.arange(step * config.batch_size,
                                (step + 1) * config.batch_size) % len(data.sequences)
            loss = task_loss(config, model, data, rows, step, torch.device("cpu"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        timings[task] = (time.perf_counter() - started) / 3
    return timings


def prepare_caches(tokenizers: list[Path], tasks: list[str], overrides: dict) -> None:
    """Encode every tokenizer's splits (and the text features) once, before the workers start,
    so that no two workers compute the same cache at once."""
    for path in tokenizers:
        tokenizer = load_tokenizer(path)
        for task in tasks:
            config = _config(task, path, Path("unused"), 0, overrides)
            for split in ("train", "val"):
                task_data(config, tokenizer, split)


def _set_aside_other_run(folder: Path, tokenizer, label: str) -> None:
    """A run in ``folder`` trained on another tokenizer's codes (the tokenizer was retrained
    since), finished or not, is neither reused nor continued: it moves to
    ``folder.previous-N`` and this one starts at step 0."""
    checkpoint = folder / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return
    if read_checkpoint_metadata(checkpoint)["extra"].get("tokenizer_digest") in (
            None, tokenizer.digest):
        return
    target = set_aside(folder)
    print(f"[downstream] {label}: {folder} holds a run on another tokenizer's codes (retrained "
          f"since); moved to {target}, training anew", flush=True)


def run_job(label: str, task: str, config_values: dict, threads: int) -> dict:
    """One (codebook, seed, task) run in a worker: train (or reuse a finished run), evaluate.
    Returns {scored task: scores} (generate also scores completion)."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = DownstreamConfig.from_dict(config_values)
    folder = Path(config.out_dir)
    done_path = folder / "scores.json"
    stat = os.stat(config.tokenizer)  # a file rewritten since (a retrained tokenizer) reloads
    key = (config.tokenizer, stat.st_mtime_ns, stat.st_size)
    tokenizer = _WORKER.get(key) or load_tokenizer(config.tokenizer)
    _WORKER[key] = tokenizer
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("config") == config.to_dict() \
                and done.get("tokenizer_digest") == tokenizer.digest:
            print(f"[downstream] {label}: reusing the finished run in {folder}", flush=True)
            return done["scores"]
    _set_aside_other_run(folder, tokenizer, label)
    config.resume = True  # an interrupted run is continued; a fresh one starts at step 0
    started = time.perf_counter()
    checkpoint = train_task(config, tokenizer=tokenizer, progress=False)
    train_seconds = time.perf_counter() - started
    config.resume = False
    scores = {task: evaluate_task(config, checkpoint, tokenizer)}
    if task == "generate":
        completion = DownstreamConfig.from_dict({**config.to_dict(), "task": "complete"})
        scores["complete"] = evaluate_task(completion, checkpoint, tokenizer,
                                           folder / "complete")
    for values in scores.values():
        values["train_seconds"] = train_seconds
    atomic_write(done_path, json.dumps({"config": config.to_dict(), "scores": scores,
                                        "tokenizer_digest": tokenizer.digest}, indent=2))
    print(f"[downstream] {label} done: {train_seconds / 60:.1f} min of training", flush=True)
    return scores


def run_downstream_demo(seeds: list[int], tokenizers: Path, out_dir: Path, overrides: dict, *,
                        tasks: list[str], workers: int = 2, threads: int = 1,
                        budget_minutes: float | None = None) -> dict:
    ensure_tokenizers(tokenizers, seeds, workers, threads)
    started = time.perf_counter()  # after the tokenizers: the report does not count them
    overrides = {"cache_dir": str(out_dir / "cache"), **overrides}
    paths = [tokenizer_path(tokenizers, prefix, seed) for seed in seeds for _, prefix in CODEBOOKS]
    prepare_caches(paths, tasks, overrides)
    if "steps" not in overrides and budget_minutes is None:
        overrides["steps"] = DEFAULT_STEPS
    if "steps" not in overrides:
        timings = seconds_per_step(tasks, paths[0], overrides)
        runs_per_worker = len(paths) / max(workers, 1)
        spent = time.perf_counter() - started
        left = max(0.0, budget_minutes * 60 * 0.7 - spent)
        steps = int(left / (runs_per_worker * sum(timings.values())))
        overrides["steps"] = max(20, steps)
        print(f"[downstream] seconds per step {timings}: {overrides['steps']} steps per run "
              f"fill the budget of {budget_minutes} min", flush=True)
    jobs = []
    for seed in seeds:
        for label, prefix in CODEBOOKS:
            for task in tasks:
                folder = out_dir / f"{prefix}_seed{seed}" / task
                values = _config(task, tokenizer_path(tokenizers, prefix, seed), folder, seed,
                                 overrides).to_dict()
                jobs.append((label, seed, task, values))
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(run_job, f"{label} seed {seed} {task}", task, values, threads)
                       for label, seed, task, values in jobs]
            results = [future.result() for future in futures]
    else:
        results = [run_job(f"{label} seed {seed} {task}", task, values, threads)
                   for label, seed, task, values in jobs]
    scores: dict[str, dict[str, list[dict]]] = {label: {} for label, _ in CODEBOOKS}
    for (label, _, _, _), result in zip(jobs, results):
        for task, values in result.items():
            scores[label].setdefault(task, []).append(values)
    minutes = (time.perf_counter() - started) / 60
    _plot_losses(jobs, out_dir / "training_curves.png")
    report = write_report(out_dir, seeds, scores, jobs, minutes, budget_minutes)
    print(Path(report).read_text())
    return {"scores": scores, "report": report, "minutes": minutes}


def _plot_losses(jobs, path: Path) -> None:
    """Training loss per task, a line per run (baseline blue, LG-VQ orange)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(job[2] for job in jobs))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    seen = set()
    for label, _, task, values in jobs:
        with open(Path(values["out_dir"]) / "metrics.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        axis = axes[0][tasks.index(task)]
        axis.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
                  color="C0" if label == "baseline" else "C1",
                  label=label if (task, label) not in seen else None)
        seen.add((task, label))
        axis.set_title(f"{task}: training loss")
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)


def write_report(out_dir: Path, seeds, scores, jobs, minutes, budget_minutes) -> str:
    rows = []
    for task, key, label, higher in METRICS:
        runs = {name: scores[name].get(task, []) for name in scores}
        if not all(runs.values()) or not all(r.get(key) is not None for v in runs.values()
                                             for r in v):
            continue
        base, lgvq = runs["baseline"], runs["LG-VQ"]
        wins = sum(b[key] != g[key] and (g[key] > b[key]) == higher
                   for b, g in zip(base, lgvq)) if higher is not None else None
        rows.append({"metric": label,
                     "baseline": mean_and_std([r[key] for r in base]),
                     "LG-VQ": mean_and_std([r[key] for r in lgvq]),
                     "LG-VQ better (seeds)": "control" if wins is None
                     else f"{wins}/{len(base)}"})
    first = jobs[0][3]
    notes = [
        f"seeds {seeds}; each task trained on each codebook with the same seed, data order and "
        f"{first['steps']} steps of batch {first['batch_size']}; transformer width "
        f"{first['width']}, {first['layers']} layers, code embeddings: {first['embedding']}",
        "Scores are on held-out items (the validation split). The judge reads the colour and "
        "shape of every object of the scene at its true position in the decoded image: "
        "text-to-image is conditioned on the caption naming every object's colour, shape and "
        "position, semantic synthesis on the scene's label map (colour and shape per code "
        "cell), completion on the upper half of the true codes. Chance is near 0 (an object "
        "must be visible, of the right colour among 8, the right shape among 5, in its cell).",
        "Understanding (Tables 11, 9, 8): captions are decoded from the codes alone and scored "
        "against every caption of the held-out image; VQA questions and grounding expressions "
        "are generated from each held-out scene's exact attributes (a fixed split: no held-out "
        "image's questions are trained on). The chance rows read no image: the most frequent "
        "training caption, the majority answer (overall and per question kind), the mean "
        "training box.",
        f"wall time: {minutes:.1f} min ("
        + (f"budget {budget_minutes} min, " if budget_minutes is not None else "")
        + "tokenizers not counted)",
    ]
    fids = [r for v in scores.values() for r in v.get("generate", [])]
    if fids and fids[0].get("fid") is None:
        notes.append("FID not computed: needs torchmetrics and --fid_weights=<a local "
                     "Inception weights file>; nothing is downloaded.")
    images = [str(out_dir / "training_curves.png")]
    for _, prefix in CODEBOOKS:
        folder = out_dir / f"{prefix}_seed{seeds[0]}"
        found = sorted(folder.glob("*/samples.png")) + sorted(folder.glob("*/complete/samples.png"))
        # not the runs set aside (task.previous-N) when a tokenizer was retrained
        images += [str(p) for p in found if ".previous-" not in p.relative_to(folder).parts[0]]
    atomic_write(out_dir / "scores.json", json.dumps(scores, indent=2))
    return write_markdown_report(out_dir / "report.md",
                                 "Downstream tasks on baseline vs LG-VQ codes", rows,
                                 columns=["metric", "baseline", "LG-VQ", "LG-VQ better (seeds)"],
                                 notes=notes, images=images)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        overrides = parse_overrides(argv)
        seeds = [int(s) for s in overrides.pop("seeds", "0,1,2").split(",") if s.strip()]
        tasks = [t for t in overrides.pop("tasks", ",".join(ALL_TASKS)).split(",") if t]
        unknown = sorted(set(tasks) - set(ALL_TASKS))
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown} (complete is scored on generate's "
                             "model)")
        tokenizers = Path(overrides.pop("tokenizers", "runs/demo"))
        out_dir = Path(overrides.pop("out_dir", "runs/downstream"))
        workers = int(overrides.pop("workers", "2"))
        threads = int(overrides.pop("threads_per_worker", "1"))
        budget = overrides.pop("budget_minutes", None)
        budget = None if budget is None else float(budget)
        run_downstream_demo(seeds, tokenizers, out_dir, overrides, tasks=tasks, workers=workers,
                            threads=threads, budget_minutes=budget)
    except (ValueError, FileNotFoundError) as error:
        print(f"lgvq.downstream.demo: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job (`make demo`, `python -m lgvq.demo`): train the plain baseline and LG-VQ on the
built-in captioned shapes with the same seeds and budget, evaluate both, print a side-by-side
table (mean ± std over seeds) and write it with plots to runs/demo/.

  python -m lgvq.demo [--seeds=0,1,2] [--steps=N] [--out_dir=runs/demo] [--workers=2]
                     [--threads_per_worker=1] [--key=value ...]

Other --key=value pairs are training-config overrides (see `lgvq presets`).
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

from lgvq.checkpoint import load_checkpoint
from lgvq.config import build_config, parse_overrides
from lgvq.evaluation.evaluate import evaluate_model
from lgvq.evaluation.report import mean_and_std, write_markdown_report
from lgvq.files import atomic_path, atomic_write
from lgvq.text import TextFeatureCache, load_text_encoder
from lgvq.training import CHECKPOINT_NAME, build_dataset, build_model, train

METRICS = [  # (key, label, higher is better)
    ("recall_at_1_one_word", "masked-word Recall@1 (1 word)", True),
    ("recall_at_1_three_words", "masked-word Recall@1 (3 words)", True),
    ("relation_mse", "word-to-code relation MSE", False),
    ("retrieval_top1", "image→text retrieval top-1", True),
    ("psnr_db", "PSNR (dB)", True),
    ("codebook_usage", "codebook usage", True),
    ("perplexity", "codebook perplexity", True),
    # controls, not goals: the same heads scored with the paper's leaky text context, and with
    # the tokens of another image (what the masked-word head gets from the text alone)
    ("recall_at_1_one_word_paper_encoding", "Recall@1 (1 word), unmasked-caption context", None),
    ("recall_at_1_one_word_shuffled_images", "Recall@1 (1 word), another image's tokens", None),
]


CURVES = [  # (metrics.csv column, panel title)
    ("reconstruction", "L1 reconstruction loss"),
    ("psnr", "training-batch PSNR (dB)"),
    ("mtp", "masked-word loss (L_mtp)"),
    ("ras", "relation loss (L_ras)"),
]


def _plot_losses(runs: dict[str, list[Path]], path: Path) -> None:
    """One panel per CURVES column, a line per run (baseline blue, LG-VQ orange). For the
    baseline, L_mtp and L_ras are its probes' losses on detached tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.5))
    for name, folders in runs.items():
        for index, folder in enumerate(folders):
            with open(folder / "metrics.csv", newline="") as stream:
                rows = list(csv.DictReader(stream))
            steps = [int(r["step"]) for r in rows]
            for axis, (column, _) in zip(axes, CURVES):
                axis.plot(steps, [float(r[column]) for r in rows],
                          color="C0" if name == "baseline" else "C1",
                          label=name if index == 0 else None)
    for axis, (_, title) in zip(axes, CURVES):
        axis.set(title=title, xlabel="step")
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


_WORKER_TEXT_ENCODER = None  # one frozen text encoder per worker process


def _train_and_evaluate(name: str, overrides: dict, threads: int) -> dict:
    """One demo run in a worker process: train (or continue) and evaluate; returns the scores,
    which are also written to ``metrics.json`` in the run folder."""
    global _WORKER_TEXT_ENCODER
    torch.set_num_threads(threads)
    if _WORKER_TEXT_ENCODER is None:  # a fresh worker: keep it to its share of the cores
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already set in this process
            pass
    config = build_config("shapes", overrides)
    folder = Path(config.out_dir)
    scores_path = folder / "metrics.json"
    if scores_path.exists() and (folder / CHECKPOINT_NAME).exists():
        scores = json.loads(scores_path.read_text())
        same = scores.get("config") == json.loads(json.dumps(config.to_dict()))
        if same:  # a finished run of exactly this config is reused
            print(f"[demo] {name}: reusing the finished run in {folder}", flush=True)
            return scores
    if _WORKER_TEXT_ENCODER is None:
        _WORKER_TEXT_ENCODER = load_text_encoder(config.text_encoder,
                                                 max_length=config.max_text_length)
    text_encoder = _WORKER_TEXT_ENCODER
    config.resume = (folder / CHECKPOINT_NAME).exists()  # an interrupted run is continued
    started = time.perf_counter()
    checkpoint = train(config, text_encoder=text_encoder, progress=False,
                       log_prefix=f"[demo] {name}")
    train_seconds = time.perf_counter() - started
    model = build_model(config, text_encoder)
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    started = time.perf_counter()
    scores = evaluate_model(model, config, text_encoder, out_dir=folder)
    config.resume = False
    scores.update(steps=config.steps, train_seconds=train_seconds,
                  eval_seconds=time.perf_counter() - started, config=config.to_dict())
    atomic_write(scores_path, json.dumps(scores, indent=2))
    print(f"[demo] {name} done in {train_seconds / 60:.1f} min: " + ", ".join(
        f"{k}={scores[k]:.4g}" for k, _, _ in METRICS), flush=True)
    return scores


def run_demo(seeds: list[int], out_dir: Path, overrides: dict, *, workers: int = 2,
             threads: int = 1) -> dict:
    """Train baseline and LG-VQ for every seed (``workers`` processes of ``threads`` torch
    threads each), evaluate them and write the side-by-side report to ``out_dir``."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_config("shapes", overrides)
    # the frozen encoder's features of every training caption: computed once, shared by all runs
    text_cache = str(out_dir / "text_features.safetensors")
    torch.set_num_threads(max(1, workers * threads))
    text_encoder = load_text_encoder(base.text_encoder, max_length=base.max_text_length)
    dataset = build_dataset(base, "train")
    captions = [c for i in range(len(dataset)) for c in dataset[i]["captions"]]
    print(f"[demo] text features of {len(captions)} training captions -> {text_cache}",
          flush=True)
    TextFeatureCache.build(text_encoder, captions, text_cache)
    del text_encoder
    print(f"[demo] ready in {time.perf_counter() - started:.0f} s; training "
          f"{2 * len(seeds)} runs of {base.steps} steps, {workers} at a time", flush=True)

    jobs = []
    for seed in seeds:
        for name, guidance in (("baseline", False), ("LG-VQ", True)):
            folder = out_dir / f"{'lgvq' if guidance else 'baseline'}_seed{seed}"
            jobs.append((name, seed, folder, {**overrides, "seed": seed,
                                              "language_guidance": guidance,
                                              "text_cache": text_cache,
                                              "out_dir": str(folder)}))
    scores: dict[str, list[dict]] = {"baseline": [], "LG-VQ": []}
    folders: dict[str, list[Path]] = {"baseline": [], "LG-VQ": []}
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_train_and_evaluate, f"{name} seed {seed}", job, threads)
                       for name, seed, _, job in jobs]
            results = [future.result() for future in futures]
    else:
        results = [_train_and_evaluate(f"{name} seed {seed}", job, threads)
                   for name, seed, _, job in jobs]
    for (name, _, folder, _), result in zip(jobs, results):
        scores[name].append(result)
        folders[name].append(folder)

    rows = []
    for key, label, higher in METRICS:
        base_stats = mean_and_std([s[key] for s in scores["baseline"]])
        lg_stats = mean_and_std([s[key] for s in scores["LG-VQ"]])
        wins = sum(lg[key] != b[key] and (lg[key] > b[key]) == higher
                   for lg, b in zip(scores["LG-VQ"], scores["baseline"]))
        rows.append({"metric": label, "baseline": base_stats, "LG-VQ": lg_stats,
                     "LG-VQ better (seeds)": "control" if higher is None
                     else f"{wins}/{len(seeds)}"})
    _plot_losses(folders, out_dir / "training_curves.png")

    def mean(name, key):
        return sum(s[key] for s in scores[name]) / len(scores[name])

    psnr_gap = mean("LG-VQ", "psnr_db") - mean("baseline", "psnr_db")
    checks = [
        ("masked-word Recall@1 (1 and 3 words) higher",
         all(mean("LG-VQ", k) > mean("baseline", k)
             for k in ("recall_at_1_one_word", "recall_at_1_three_words"))),
        ("relation MSE lower", mean("LG-VQ", "relation_mse") < mean("baseline", "relation_mse")),
        (f"PSNR no more than 0.5 dB below the baseline ({psnr_gap:+.2f} dB)", psnr_gap >= -0.5),
    ]
    minutes = (time.perf_counter() - started) / 60
    train_minutes = sum(s["train_seconds"] for v in scores.values() for s in v) / 60
    notes = [
        f"seeds: {seeds}; {base.steps} steps of batch {base.batch_size} per run; "
        f"{base.image_size}x{base.image_size} captioned shapes ({base.train_images} training, "
        f"{base.eval_images} held-out images); K={base.codebook_size}, D={base.code_dim}; "
        f"alpha={base.alpha}, beta={base.beta}, gamma={base.gamma}; "
        f"mask_before_encoding={base.mask_before_encoding}",
        "The baseline trains the same heads on detached tokens (probes, same budget), so both "
        "models are scored by one protocol.",
        f"wall time: {minutes:.1f} min ({train_minutes:.1f} min of training over "
        f"{workers} worker(s) x {threads} thread(s))",
        "LG-VQ vs baseline, means over seeds: " + "; ".join(
            f"{text}: {'yes' if passed else 'NO'}" for text, passed in checks),
    ]
    report = write_markdown_report(
        out_dir / "report.md", "LG-VQ vs baseline on captioned shapes", rows,
        columns=["metric", "baseline", "LG-VQ", "LG-VQ better (seeds)"], notes=notes,
        images=[str(out_dir / "training_curves.png")]
        + [str(folders[n][0] / "eval_reconstruction.png") for n in folders])
    print(Path(report).read_text())
    return {"scores": scores, "rows": rows, "report": report}


def main(argv: list[str] | None = None) -> int:
    overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
    seeds = [int(s) for s in overrides.pop("seeds", "0,1,2").split(",") if s.strip()]
    out_dir = Path(overrides.pop("out_dir", "runs/demo"))
    workers = int(overrides.pop("workers", "2"))
    threads = int(overrides.pop("threads_per_worker", "1"))
    run_demo(seeds, out_dir, overrides, workers=workers, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

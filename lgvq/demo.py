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

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata
from lgvq.config import build_config, parse_overrides
from lgvq.evaluation.evaluate import evaluate_model
from lgvq.evaluation.report import mean_and_std, write_markdown_report
from lgvq.files import atomic_path, atomic_write, set_aside
from lgvq.data import dataset_captions
from lgvq.text import TextFeatureCache, load_text_encoder
from lgvq.training import CHECKPOINT_NAME, build_dataset, build_model, check_resumable, train

METRICS = [  # (key, label, higher is better; None: a control, not a goal)
    ("psnr_db", "PSNR (dB)", True),
    ("colour_fidelity", "colour fidelity: objects whose reconstructed colour is right", True),
    ("shape_fidelity", "shape fidelity: objects whose reconstructed shape is right", True),
    ("recall_at_1_one_word", "masked-word Recall@1 (1 word)", True),
    ("recall_at_1_one_word_shuffled_images",
     "  control: the same, with another image's tokens", None),
    ("recall_gap_one_word", "  gap: Recall@1 minus its control (what the head reads)", True),
    ("recall_at_1_three_words", "masked-word Recall@1 (3 words)", True),
    ("recall_at_1_one_word_paper_encoding",
     "  control: Recall@1 (1 word) with the unmasked caption as context", None),
    ("relation_mse", "word-to-code relation MSE", False),
    ("retrieval_8way_top1", "image→text retrieval top-1 among 8 (chance 0.125)", True),
    ("retrieval_8way_top5", "image→text retrieval top-5 among 8 (chance 0.625)", True),
    ("retrieval_top1", "image→text retrieval top-1 among all held-out images", True),
    ("retrieval_top5", "image→text retrieval top-5 among all held-out images", True),
    ("codebook_usage", "codebook usage", True),
    ("perplexity", "codebook perplexity", True),
]
CATEGORIES = ("colour", "shape", "size", "count", "position", "relation", "template")


CURVES = [  # (metrics.csv column, panel title)
    ("reconstruction", "reconstruction loss"),
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
    config, _ = _demo_config(overrides)
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
    _set_aside_other_config(folder, config, name)
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
        f"{k}={scores[k]:.4g}" for k, _, _ in METRICS if k in scores), flush=True)
    return scores


def _set_aside_other_config(folder: Path, config, name: str) -> None:
    """A run in ``folder`` trained with another config (a changed preset, other overrides) is
    neither continued nor overwritten: it moves to ``folder.previous-N`` and this one starts."""
    checkpoint = folder / CHECKPOINT_NAME
    if not checkpoint.exists():
        return
    try:
        check_resumable(read_checkpoint_metadata(checkpoint)["config"], config)
        return
    except ValueError as difference:
        target = set_aside(folder)
        print(f"[demo] {name}: {folder} holds a run of another config "
              f"({str(difference).split(';')[0]}); "
              f"moved to {target}, training anew", flush=True)


def dataset_label(config) -> str:
    """The data set a run trained on, as the report names it."""
    if config.dataset == "shapes":
        return (f"captioned shapes ({config.image_size}x{config.image_size}, "
                f"{config.train_images} training and {config.eval_images} held-out images)")
    return f"{config.dataset} data set at {config.data_root} ({config.image_size}x{config.image_size})"


def _demo_config(overrides: dict):
    """The demo's base config: the ``shapes`` preset with the overrides. On another data set
    than captioned shapes every word is maskable (the attribute words are shapes' own)."""
    if overrides.get("dataset", "shapes") != "shapes" and "mask_words" not in overrides:
        overrides = {**overrides, "mask_words": "all"}
    return build_config("shapes", overrides), overrides


def run_demo(seeds: list[int], out_dir: Path, overrides: dict, *, workers: int = 2,
             threads: int = 1) -> dict:
    """Train baseline and LG-VQ for every seed (``workers`` processes of ``threads`` torch
    threads each), evaluate them and write the side-by-side report to ``out_dir``."""
    started = time.perf_counter()
    base, overrides = _demo_config(overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the frozen encoder's features of every training caption: computed once, shared by all runs
    text_cache = str(out_dir / "text_features.safetensors")
    torch.set_num_threads(max(1, workers * threads))
    text_encoder = load_text_encoder(base.text_encoder, max_length=base.max_text_length)
    captions = dataset_captions(build_dataset(base, "train"))
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
    _plot_losses(folders, out_dir / "training_curves.png")
    minutes = (time.perf_counter() - started) / 60
    report = _write_report(out_dir, base, seeds, scores, folders, minutes, workers, threads)
    print(Path(report).read_text())
    return {"scores": scores, "report": report}


def _present(scores: dict[str, list[dict]], key: str) -> bool:
    return all(key in s and s[key] == s[key] for runs in scores.values() for s in runs)


def _write_report(out_dir: Path, base, seeds, scores, folders, minutes, workers, threads) -> str:
    """report.md: the side-by-side table, recall per word category, the checks, the pictures."""
    rows = []
    for key, label, higher in METRICS:
        if not _present(scores, key):
            continue
        wins = sum(lg[key] != b[key] and (lg[key] > b[key]) == higher
                   for lg, b in zip(scores["LG-VQ"], scores["baseline"]))
        rows.append({"metric": label,
                     "baseline": mean_and_std([s[key] for s in scores["baseline"]]),
                     "LG-VQ": mean_and_std([s[key] for s in scores["LG-VQ"]]),
                     "LG-VQ better (seeds)": "control" if higher is None
                     else f"{wins}/{len(seeds)}"})

    def mean(name, key):
        return sum(s[key] for s in scores[name]) / len(scores[name])

    category_rows = []
    for category in CATEGORIES:
        if not _present(scores, f"recall_at_1_{category}"):
            continue
        row = {"words": category,
               "chance": f"{mean('LG-VQ', f'recall_chance_{category}'):.3f}"}
        for name in scores:
            row[f"{name} Recall@1"] = mean_and_std(
                [s[f"recall_at_1_{category}"] for s in scores[name]])
            row[f"{name} control"] = mean_and_std(
                [s[f"recall_at_1_{category}_shuffled_images"] for s in scores[name]])
            row[f"{name} gap (min over seeds)"] = (
                f"{min(s[f'recall_gap_{category}'] for s in scores[name]):+.3f}")
        category_rows.append(row)

    psnr_gap = mean("LG-VQ", "psnr_db") - mean("baseline", "psnr_db")
    lowest_gap = min(s["recall_gap_one_word"] for s in scores["LG-VQ"])
    checks = [(f"PSNR of LG-VQ no more than 0.5 dB below the baseline ({psnr_gap:+.2f} dB)",
               psnr_gap >= -0.5),
              (f"LG-VQ's masked-word head reads the image: Recall@1 minus its shuffled-image "
               f"control >= 0.15 on every seed (lowest {lowest_gap:+.3f})", lowest_gap >= 0.15),
              ("relation MSE lower for LG-VQ",
               mean("LG-VQ", "relation_mse") < mean("baseline", "relation_mse"))]
    if _present(scores, "colour_fidelity"):
        lowest = min(s["colour_fidelity"] for runs in scores.values() for s in runs)
        checks.insert(0, (f"colour fidelity >= 0.9 for both models on every seed (lowest "
                          f"{lowest:.3f})", lowest >= 0.9))
    train_minutes = sum(s["train_seconds"] for v in scores.values() for s in v) / 60
    words = ("attribute words (colour, shape, size, count, position, relation)"
             if base.dataset == "shapes" else "any word")
    notes = [
        f"data: {dataset_label(base)}",
        f"seeds: {seeds}; {base.steps} steps of batch {base.batch_size} per run; "
        f"tokenizer {base.backbone} with {base.pixel_loss} pixel loss, K={base.codebook_size}, "
        f"D={base.code_dim}; language weights alpha={base.alpha}, beta={base.beta}, "
        f"gamma={base.gamma}; masked-word context: "
        + (f"masked captions' {base.masked_text_features}" if base.mask_before_encoding
           else "the unmasked caption (paper)")
        + "; masked text decoder "
        + (f"{base.decoder_width} wide" if base.decoder_width else "at the text width")
        + f" with {base.decoder_heads} head(s), {base.decoder_layers} layer(s), dropout "
        f"{base.decoder_dropout:g}; {base.captions_per_image} caption(s) per image per step"
        + f"; training masks {base.mask_words} words; head over the "
        f"{'training captions' if base.word_vocabulary == 'data' else 'full'} vocabulary",
        "The baseline trains the same heads on detached tokens (probes, same budget), so both "
        "models are scored by one protocol.",
        f"Masked-word Recall@1 masks one of the {words} in every held-out caption of each "
        f"image ({scores['LG-VQ'][0].get('recall_words_one_word', 0)} words). Its control "
        "scores each caption against the tokens of another image: the head's text prior. The "
        "gap between the two is what the head reads from the image.",
        f"wall time: {minutes:.1f} min ({train_minutes:.1f} min of training over "
        f"{workers} worker(s) x {threads} thread(s))",
        "Checks: " + "; ".join(f"{text}: {'yes' if passed else 'NO'}" for text, passed in checks),
    ]
    if _present(scores, "judge_colour_accuracy"):
        notes.append("The attribute judge on the original renders (its own check): colour "
                     f"{mean('LG-VQ', 'judge_colour_accuracy'):.3f}, shape "
                     f"{mean('LG-VQ', 'judge_shape_accuracy'):.3f}.")
    images = [str(out_dir / "training_curves.png")]
    images += [str(folders[name][0] / "eval_reconstruction.png") for name in folders]
    tables = [("Recall@1 per word category (one masked word of that kind; chance = 1 / the "
               "category's words)", category_rows)] if category_rows else []
    return write_markdown_report(
        out_dir / "report.md", f"LG-VQ vs baseline on {dataset_label(base)}", rows,
        columns=["metric", "baseline", "LG-VQ", "LG-VQ better (seeds)"], notes=notes,
        images=images, tables=tables)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(argument in ("-h", "--help") for argument in argv):
        print(__doc__.strip())
        return 0
    overrides = parse_overrides(argv)
    seeds = [int(s) for s in overrides.pop("seeds", "0,1,2").split(",") if s.strip()]
    out_dir = Path(overrides.pop("out_dir", "runs/demo"))
    workers = int(overrides.pop("workers", "2"))
    threads = int(overrides.pop("threads_per_worker", "1"))
    run_demo(seeds, out_dir, overrides, workers=workers, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

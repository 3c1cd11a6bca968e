"""Scoring a trained generation task without downloads.

* held-out loss: cross-entropy per code on the validation split (nats; causal tasks: next code,
  t2i: the masked codes of one seeded cosine-schedule masking);
* captioned shapes, the exact judge (``lgvq.evaluation.attributes.attribute_fidelity``): the
  colour and shape of every object of the scene the condition describes, read at the object's
  position in the decoded image. t2i is conditioned on the caption naming every object's
  colour, shape and position; semantic synthesis on the scene's label map; completion on the
  upper rows (scored on the objects centred in the completed rows). Beside it, the judge's
  accuracy on the real renders (the judge's own check) and on the tokenizer's reconstructions
  of the true codes (the ceiling a generator on these codes can reach);
* completion: PSNR of the completed lower half against the held-out image's, beside the
  tokenizer reconstruction's;
* FID through torchmetrics with a local Inception weights file, when both are present.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lgvq.downstream.codes import FrozenTokenizer, split_dataset, encode_split
from lgvq.downstream.sampling import SamplingOptions, sample_autoregressive, sample_maskgit
from lgvq.downstream.tasks import (
    UNDERSTANDING_TASKS,
    DownstreamConfig,
    code_cache_dir,
    load_task_model,
    positional_captions,
    prepare_data,
    task_loss,
    text_context,
)
from lgvq.evaluation.attributes import attribute_fidelity
from lgvq.evaluation.metrics import psnr
from lgvq.evaluation.report import save_image_grid, write_markdown_report
from lgvq.files import atomic_write
from lgvq_kernels import resolve_device

FID_MISSING = ("FID not computed: {why}. FID needs torchmetrics (pip install torchmetrics "
               "torch-fidelity) and --fid_weights=<a local Inception weights file>; nothing is "
               "downloaded. The rest of the report does not depend on it.")


def frechet_inception_distance(real: torch.Tensor, generated: torch.Tensor,
                               weights: str) -> tuple[float | None, str]:
    """(FID, "") through torchmetrics with Inception weights read from ``weights``, or
    (None, why not) when torchmetrics or the file is missing."""
    if not weights:
        return None, FID_MISSING.format(why="no --fid_weights given")
    if not Path(weights).is_file():
        return None, FID_MISSING.format(why=f"--fid_weights file {weights} not found")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, FID_MISSING.format(why="torchmetrics is not installed")
    metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                      feature_extractor_weights_path=weights)
    metric.update((real + 1) / 2, real=True)
    metric.update((generated + 1) / 2, real=False)
    return float(metric.compute()), ""


def _real_images(tokenizer: FrozenTokenizer, config: DownstreamConfig, count: int):
    dataset = split_dataset(tokenizer, "val", config.eval_images)
    return torch.stack([dataset[i]["image"] for i in range(count)])


def _judge(prefix: str, images: torch.Tensor, scenes, below: float = 0.0) -> dict:
    """The judge's accuracies over the objects whose centre lies at or below ``below`` (a
    fraction of the image height; 0 = every object): completion is judged on what it drew."""
    fidelity = attribute_fidelity(images, scenes)
    kept = np.array([scenes[i].objects[o].centre_y >= below
                     for i, o in zip(fidelity.image_index, fidelity.object_index)], dtype=bool)
    if not kept.any():
        return {}
    colour, shape = fidelity.colour_correct[kept], fidelity.shape_correct[kept]
    return {f"{prefix}_colour": float(colour.mean()), f"{prefix}_shape": float(shape.mean()),
            f"{prefix}_object": float((colour & shape).mean()),
            f"{prefix}_objects_judged": int(kept.sum())}


@torch.no_grad()
def generate_for_evaluation(config: DownstreamConfig, model, tokenizer: FrozenTokenizer,
                            data, count: int, device) -> torch.Tensor:
    """The task's generated codes ``[count, h, w]`` for the first ``count`` held-out items
    (unconditional: ``count`` free samples), seeded by ``config.seed``."""
    grid = tokenizer.grid
    generator = torch.Generator().manual_seed(config.seed + 99991)
    options = SamplingOptions(config.temperature, config.top_k, config.top_p)
    if config.task == "t2i":
        captions = positional_captions(data.split)[:count]
        context, mask = text_context(data.text, captions, device)
        codes = sample_maskgit(model, count, steps=config.maskgit_steps, context=context,
                               context_mask=mask, guidance_scale=config.guidance_scale,
                               options=options, generator=generator)
    else:
        given, prefix = None, data.prefix[:count]
        if config.task == "generate":
            prefix = torch.zeros(count, 1, dtype=torch.long)  # the start token
        if config.task == "complete":
            given = data.sequences[:count, :completion_rows(config, grid) * grid].to(device)
        codes = sample_autoregressive(model, prefix.to(device), given,
                                      options=options, generator=generator)
    return codes.reshape(count, grid, grid).cpu()


def completion_rows(config: DownstreamConfig, grid: int) -> int:
    rows = config.completion_rows or grid // 2
    if not 0 < rows < grid:
        raise ValueError(f"--completion_rows must be in [1, {grid - 1}], got {rows}")
    return rows


def evaluate_task(config: DownstreamConfig, checkpoint: str | Path, tokenizer: FrozenTokenizer,
                  out_dir: str | Path | None = None) -> dict:
    """Scores of a trained task (see the module docstring); writes ``samples.png``,
    ``metrics.json`` and ``report.md`` into ``out_dir`` (default: the checkpoint's folder)."""
    if config.task in UNDERSTANDING_TASKS:
        from lgvq.downstream.understanding_evaluation import evaluate_understanding

        return evaluate_understanding(config, checkpoint, tokenizer, out_dir)
    device = resolve_device(config.device)
    out_dir = Path(out_dir or Path(checkpoint).parent)
    split = encode_split(tokenizer, "val", config.eval_images, code_cache_dir(config))
    data = prepare_data(config, tokenizer, split)
    model = load_task_model(checkpoint, config, tokenizer, device)
    count = min(config.samples, len(split)) if config.task != "generate" else config.samples
    scored = min(count, len(split))  # real items beside the generated ones
    scores: dict = {"task": config.task, "embedding": config.embedding,
                    "eval_images": len(split), "generated": count}
    generator_state = torch.get_rng_state()
    held_out = dataclasses.replace(config, condition_dropout=0.0)
    with torch.no_grad():
        scores["heldout_loss"] = float(task_loss(held_out, model, data,
                                                 torch.arange(len(split)), 0, device))
    torch.set_rng_state(generator_state)
    codes = generate_for_evaluation(config, model, tokenizer, data, count, device)
    generated = tokenizer.decode(codes)
    real = _real_images(tokenizer, config, scored)
    reconstructed = tokenizer.decode(split.codes[:scored])
    scores["generated_distinct_codes"] = int(codes.unique().numel())
    scores["real_distinct_codes"] = int(split.codes[:scored].unique().numel())
    if config.task == "complete":
        cut = completion_rows(config, tokenizer.grid) * (real.shape[-1] // tokenizer.grid)
        scores["completion_rows"] = completion_rows(config, tokenizer.grid)
        scores["completion_psnr_db"] = float(psnr(generated[..., cut:, :],
                                                  real[..., cut:, :]).mean())
        scores["reconstruction_lower_psnr_db"] = float(psnr(reconstructed[..., cut:, :],
                                                            real[..., cut:, :]).mean())
    if split.attributes is not None and config.task != "generate":
        scenes = split.attributes[:scored]
        below = (completion_rows(config, tokenizer.grid) / tokenizer.grid
                 if config.task == "complete" else 0.0)
        scores.update(_judge("judge_generated", generated, scenes, below))
        scores.update(_judge("judge_real", real, scenes, below))
        scores.update(_judge("judge_reconstructed", reconstructed, scenes, below))
    fid, note = frechet_inception_distance(real, generated[:scored], config.fid_weights)
    scores["fid"] = fid
    notes = [note] if note else []
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = min(8, scored)
    grid_path = out_dir / "samples.png"
    save_image_grid(torch.cat([real[:rows], reconstructed[:rows], generated[:rows]]), grid_path,
                    nrow=rows, scale=max(1, 96 // real.shape[-1]),
                    row_labels=["held-out images", "tokenizer reconstructions",
                                f"{config.task} samples"])
    atomic_write(out_dir / "metrics.json", json.dumps(scores, indent=2))
    write_markdown_report(out_dir / "report.md", f"lgvq downstream {config.task}",
                          [{"metric": k, "value": v} for k, v in scores.items()],
                          columns=["metric", "value"], notes=notes, images=[str(grid_path)])
    return scores


__all__ = ["evaluate_task", "frechet_inception_distance", "generate_for_evaluation"]

"""Language heads trained alone on a frozen tokenizer: how much of what the captions say can a
head read from its codes? (`lgvq probe CHECKPOINT [--key=value ...]`)

The tokenizer of a training checkpoint (LG-VQ or the baseline) is frozen and its codes of every
training image computed once; fresh language heads (visual-token encoder, masked text decoder,
word head) then train on them as the baseline's probes do (the same losses, data order, caption
draws, masks and schedule as ``lgvq.training.train``), and are scored by ``evaluate_model``.
``--key=value`` pairs override the checkpoint's config for the heads and their training
(``steps``, ``decoder_width``, ``captions_per_image``, ``head_learning_rate``...); the
tokenizer's own settings cannot change.

This is how the demo's head settings were chosen (docs/method.md, "The demo's settings"): the
heads' reading of one fixed set of codes, without the tokenizer moving under them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata
from lgvq.config import TrainConfig
from lgvq.data import dataset_captions
from lgvq.evaluation.evaluate import evaluate_model
from lgvq.files import atomic_write
from lgvq.text import TextFeatureCache, load_text_encoder
from lgvq.training import (
    adam,
    batch_indices,
    build_dataset,
    build_model,
    learning_rate_factor,
    mask_words,
    masked_context,
    step_captions,
)

# what a probe may change: the heads, their training, and what is scored
PROBE_KEYS = ("steps", "batch_size", "seed", "head_learning_rate", "learning_rate_schedule",
              "warmup_steps", "adam_betas", "alpha", "beta", "gamma", "label_smoothing",
              "temperature", "visual_width", "decoder_width", "decoder_heads", "decoder_dropout",
              "decoder_layers",
              "captions_per_image", "mask_words", "mask_before_encoding",
              "masked_text_features", "word_vocabulary", "centre_text_targets", "eval_images",
              "threads")


def probe_config(saved: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's config ``saved`` with the probe's ``overrides`` (strings or values)."""
    unknown = sorted(set(overrides) - set(PROBE_KEYS))
    if unknown:
        raise ValueError(f"lgvq probe changes only the heads and their training; cannot set "
                         f"{unknown} (allowed: {', '.join(PROBE_KEYS)})")
    values = {**saved, **overrides, "language_guidance": False}
    if "head_learning_rate" not in overrides and not saved.get("head_learning_rate"):
        values["head_learning_rate"] = saved["learning_rate"]  # the rate the heads trained at
    return TrainConfig.from_dict(values)


def probe_heads(checkpoint: str | Path, overrides: dict | None = None, *, text_encoder=None,
                out: str | Path | None = None, progress: bool = False) -> dict:
    """Train fresh heads on the frozen codes of ``checkpoint``'s tokenizer; returns the scores
    of ``evaluate_model`` plus ``probe_seconds``, and writes them as JSON to ``out`` if given."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {checkpoint}")
    saved = read_checkpoint_metadata(str(checkpoint))["config"]
    config = probe_config(saved, dict(overrides or {}))
    if config.threads:
        torch.set_num_threads(config.threads)
    saved_config = TrainConfig.from_dict(saved)
    text_encoder = text_encoder or load_text_encoder(config.text_encoder,
                                                     max_length=config.max_text_length)
    dataset = build_dataset(config, "train")
    captions = dataset_captions(dataset)
    saved = build_model(saved_config, text_encoder, captions=captions)
    load_checkpoint(str(checkpoint), model=saved, restore_rng=False)
    torch.manual_seed(config.seed)
    model = build_model(config, text_encoder, tokenizer=saved.tokenizer, captions=captions)
    model.tokenizer.requires_grad_(False)
    cache = TextFeatureCache.build(text_encoder, captions, config.text_cache or None)
    started = time.perf_counter()
    with torch.no_grad():
        model.tokenizer.eval()
        codes = torch.cat([
            model.tokenizer.encode(torch.stack([dataset[i]["image"] for i in
                                                range(first, min(first + 128, len(dataset)))]))[1]
            for first in range(0, len(dataset), 128)])
    image_captions = [dataset[i]["captions"] for i in range(len(dataset))]
    heads = list(model.head_parameters())
    optimizer = adam(heads, lr=config.head_learning_rate, betas=config.adam_betas)
    model.train()
    model.tokenizer.eval()
    for step in tqdm(range(config.steps), desc="lgvq-probe", disable=not progress):
        rows = batch_indices(config.seed, step, config.batch_size, len(dataset))
        text = cache.encode(step_captions([image_captions[int(i)] for i in rows], config, step))
        masked_ids, masked = mask_words(text_encoder, text, config, step)
        context = masked_context(config, text_encoder, masked_ids, text)
        loss = model.language_losses(codes[rows], text, masked, context).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = config.head_learning_rate * learning_rate_factor(config, step)
        optimizer.step()
    scores = evaluate_model(model, config, text_encoder)
    scores["probe_seconds"] = time.perf_counter() - started
    scores["probe_config"] = {key: getattr(config, key) for key in PROBE_KEYS}
    if out is not None:
        atomic_write(Path(out), json.dumps(scores, indent=2, default=str))
    return scores

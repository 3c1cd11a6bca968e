"""The LG-VQ training loop: one readable function, `train(config)`.

Everything that varies between steps is a pure function of (seed, step): the batch order, the
caption drawn per image and the masked words. With the model, optimizer and RNG state in the
checkpoint, a resumed run continues bit for bit like an uninterrupted one.
"""

from __future__ import annotations

import enum
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lgvq.alignment import draw_mask_ratio
from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from lgvq.config import TrainConfig
from lgvq.data import ALL_ATTRIBUTE_WORDS, dataset_captions, draw_captions_per_image
from lgvq.data import build_dataset as build_named_dataset
from lgvq.data_parallel import init_parallel
from lgvq_kernels import resolve_device
from lgvq.evaluation.metrics import psnr
from lgvq.evaluation.report import save_image_grid
from lgvq.evaluation.words import word_token_mask
from lgvq.files import append_csv_row, truncate_csv_rows
from lgvq.models import (
    LGVQ,
    BackboneConfig,
    LanguageLossWeights,
    VQModelConfig,
    build_vqgan,
    build_vqvae,
)
from lgvq.text import CLIPTextEncoder, TextFeatureCache, load_text_encoder
from lgvq.text.masking import mask_word_tokens
from lgvq.text.features import TextFeatures

CHECKPOINT_NAME = "last.safetensors"
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: decorrelates (seed, step) pairs


class RandomStream(enum.IntEnum):
    """The independent random draws of one training step; the values are the seeds' stream
    numbers, so they must never change (a resumed or repeated run would draw differently)."""

    BATCH_ORDER = 1  # the permutation of an epoch (the "step" of this stream is the epoch)
    CAPTION_DRAW = 2  # which caption of each image the step trains on
    WORD_MASKS = 3  # the masking ratio and the masked words


def step_generator(seed: int, step: int, stream: RandomStream) -> torch.Generator:
    """A torch.Generator that depends only on (seed, step, stream)."""
    value = (seed * _MIX + step * 1_000_003 + int(stream) * 7919) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def learning_rate_factor(config: TrainConfig, step: int) -> float:
    """The learning rates' multiplier at ``step`` (0-based): 1 for the paper's constant rate;
    for ``cosine`` a linear warm-up over ``warmup_steps``, then half a cosine down to 0 at
    ``steps``. A pure function of the step, so a resumed run follows the same schedule."""
    if config.learning_rate_schedule == "constant":
        return 1.0
    if config.learning_rate_schedule != "cosine":
        raise ValueError("learning_rate_schedule must be constant or cosine, got "
                         f"{config.learning_rate_schedule!r}")
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    return warmup * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))


def batch_indices(seed: int, step: int, batch_size: int, dataset_size: int) -> torch.Tensor:
    """Indices of the images of ``step``: epochs are seeded permutations; the last partial batch
    of an epoch wraps into the next epoch's permutation."""
    start = step * batch_size
    epoch_first, epoch_last = start // dataset_size, (start + batch_size - 1) // dataset_size
    order = torch.cat([torch.randperm(dataset_size,
                                     generator=step_generator(seed, e, RandomStream.BATCH_ORDER))
                       for e in range(epoch_first, epoch_last + 1)])
    offset = start - epoch_first * dataset_size
    return order[offset:offset + batch_size]


# ----------------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------------


def build_dataset(config: TrainConfig, split: str):
    """The ``split`` of the configured data set (captioned shapes: ``train_images`` or
    ``eval_images`` items)."""
    size = config.train_images if split == "train" else config.eval_images
    options = {}
    if config.dataset == "shapes":
        options = {"radii": tuple(config.object_radii), **({"size": size} if size else {})}
    return build_named_dataset(config.dataset, root=config.data_root or None, split=split,
                               image_size=config.image_size, **options)


def quantizer_kwargs(config: TrainConfig) -> dict:
    """``build_quantizer``'s arguments (besides dim and K) from the training config."""
    return {"kind": config.quantizer, "commitment_weight": config.commitment_weight,
            "codebook_weight": config.codebook_weight, "ema_decay": config.ema_decay,
            "dead_code_threshold": config.dead_code_threshold, "backend": config.backend}


def build_backbone(config: TrainConfig):
    """The tokenizer and its objective (lgvq.models.build_vqvae / build_vqgan, a
    ``BuiltVQModel(model, loss)``): L1 + VQ for ``vqvae``; for ``vqgan`` also LPIPS (when
    ``lpips_weights`` exists locally, else a warning) and the adaptive-weight hinge PatchGAN
    term from step ``disc_start`` on."""
    builders = {"vqvae": build_vqvae, "vqgan": build_vqgan}
    if config.backbone not in builders:
        raise ValueError(f"backbone must be vqvae or vqgan, got {config.backbone!r}")
    backbone = BackboneConfig(image_size=config.image_size, base_channels=config.base_channels,
                              channel_multipliers=config.channel_multipliers,
                              num_res_blocks=config.res_blocks, z_channels=config.code_dim)
    vq_config = VQModelConfig(backbone=backbone, embed_dim=config.code_dim,
                              codebook_size=config.codebook_size,
                              quantizer_kwargs=quantizer_kwargs(config),
                              lpips_weights_path=config.lpips_weights or None,
                              disc_start=config.disc_start, disc_weight=config.disc_weight,
                              disc_layers=config.disc_layers,
                              disc_channels=config.disc_channels,
                              pixel_loss=config.pixel_loss)
    return builders[config.backbone](vq_config)


def word_vocabulary(config: TrainConfig, text_encoder, captions: list[str] | None = None):
    """The token ids the masked-word head scores: with ``word_vocabulary=data`` the sorted
    distinct real-word ids of the training captions (``captions``, default: the configured
    training split's), with ``full`` None (the encoder's whole vocabulary)."""
    if config.word_vocabulary == "full":
        return None
    if config.word_vocabulary != "data":
        raise ValueError(f"word_vocabulary must be data or full, got {config.word_vocabulary!r}")
    if captions is None:
        captions = dataset_captions(build_dataset(config, "train"))
    tokens = text_encoder.tokenize(sorted(set(captions)))
    return torch.unique(tokens.ids[tokens.word_mask])


def _check_head_sizes(config: TrainConfig) -> None:
    for name in ("visual_width", "decoder_width"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"--{name} must be an int >= 0 (0: the paper's width), got {value!r}")
    if not isinstance(config.decoder_layers, int) or config.decoder_layers < 1:
        raise ValueError(f"--decoder_layers must be an int >= 1, got {config.decoder_layers!r}")
    if not isinstance(config.decoder_heads, int) or config.decoder_heads < 1:
        raise ValueError(f"--decoder_heads must be an int >= 1, got {config.decoder_heads!r}")
    dropout = config.decoder_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"--decoder_dropout must be a number in [0, 1), got {dropout!r}")
    value = config.captions_per_image
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--captions_per_image must be an int >= 1, got {value!r}")
    if config.decoder_width and config.decoder_width % config.decoder_heads:
        raise ValueError(f"--decoder_width ({config.decoder_width}) must be divisible by "
                         f"--decoder_heads ({config.decoder_heads})")


def build_model(config: TrainConfig, text_encoder, tokenizer: nn.Module | None = None,
                captions: list[str] | None = None) -> LGVQ:
    """LG-VQ (or the baseline) around ``tokenizer`` (default: ``build_backbone(config).model``);
    ``captions``: the training captions, when the caller has them (else they are read again)."""
    _check_head_sizes(config)
    tokenizer = build_backbone(config).model if tokenizer is None else tokenizer
    grid = config.image_size // 2 ** (len(config.channel_multipliers) - 1)
    weights = LanguageLossWeights(alpha=config.alpha, beta=config.beta, gamma=config.gamma,
                                  temperature=config.temperature,
                                  label_smoothing=config.label_smoothing)
    return LGVQ(tokenizer, code_dim=config.code_dim, num_tokens=grid * grid,
                text_width=text_encoder.width, global_width=text_encoder.global_dim,
                max_length=text_encoder.max_length,
                token_embedding=text_encoder.token_embedding, weights=weights,
                language_guidance=config.language_guidance, backend=config.backend,
                visual_width=config.visual_width, decoder_width=config.decoder_width,
                decoder_heads=config.decoder_heads, decoder_dropout=config.decoder_dropout,
                decoder_layers=config.decoder_layers,
                vocabulary=word_vocabulary(config, text_encoder, captions))


# ----------------------------------------------------------------------------------------------
# one batch
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]  # config.captions_per_image drawn captions per image, image-major


def load_batch(dataset, config: TrainConfig, step: int) -> Batch:
    indices = batch_indices(config.seed, step, config.batch_size, len(dataset))
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([item["image"] for item in items])
    return Batch(images, step_captions([item["captions"] for item in items], config, step))


def step_captions(captions: list[list[str]], config: TrainConfig, step: int) -> list[str]:
    """The captions step ``step`` trains on, given the captions of each of its images:
    ``config.captions_per_image`` per image, image-major, from the step's own seeded draw."""
    return draw_captions_per_image(captions, config.captions_per_image,
                                   generator=step_generator(config.seed, step,
                                                            RandomStream.CAPTION_DRAW))


def caption_rows_of(image_rows: torch.Tensor, per_image: int) -> torch.Tensor:
    """The caption rows (image-major, ``per_image`` per image) of the images ``image_rows``."""
    return (image_rows[:, None] * per_image + torch.arange(per_image)).flatten()


def maskable_words(config: TrainConfig, text_encoder, text) -> torch.Tensor:
    """bool ``[B, T]``: the tokens training may mask. ``mask_words=attributes`` keeps the words
    that name an attribute of captioned shapes (colour, shape, size, count, position,
    relation); ``all`` every real word."""
    if config.mask_words == "all":
        return text.word_mask
    if config.mask_words != "attributes":
        raise ValueError(f"mask_words must be all or attributes, got {config.mask_words!r}")
    if config.dataset != "shapes":
        raise ValueError("mask_words=attributes needs --dataset=shapes (the attribute words are "
                         f"those of captioned shapes), got --dataset={config.dataset}")
    return attribute_word_mask(text_encoder, text)


def attribute_word_mask(text_encoder, text) -> torch.Tensor:
    """bool ``[B, T]``: the tokens of the captioned-shapes attribute words."""
    tokenizer = text_encoder.tokenizer
    markers = ({"continuation_prefix": None, "end_of_word_suffix": "</w>"}
               if isinstance(text_encoder, CLIPTextEncoder) else {})  # CLIP BPE vs WordPiece
    return word_token_mask(text.ids, text.attention_mask, ALL_ATTRIBUTE_WORDS,
                           decode_token=lambda i: tokenizer.convert_ids_to_tokens(int(i)),
                           special_mask=text.special_mask, **markers)


def mask_words(text_encoder, text, config: TrainConfig, step: int):
    """The masked slots of this step: one ratio per batch (``draw_mask_ratio``), each maskable
    word (``maskable_words``) masked with it. Returns (masked ids, masked) on the CPU."""
    generator = step_generator(config.seed, step, RandomStream.WORD_MASKS)
    ratio = draw_mask_ratio(generator)
    text = text.to("cpu")
    return mask_word_tokens(text.ids, maskable_words(config, text_encoder, text),
                            text_encoder.mask_token_id, ratio, generator)


def adam(params, **options) -> torch.optim.Adam:
    """torch.optim.Adam with the multi-tensor (``foreach``) update on every device. PyTorch
    picks it by default on CUDA only; on CPU the per-parameter loop costs the demo's LG-VQ step
    (about 200 small tensors, heads included) ~3 ms of ~100 ms (2-core EPYC). The updates are
    bitwise those of the loop (tests/test_training_optimizers.py), so trained weights and
    committed figures do not move."""
    return torch.optim.Adam(params, foreach=True, **options)


def masked_context(config: TrainConfig, text_encoder, masked_ids: torch.Tensor,
                   text: TextFeatures) -> torch.Tensor:
    """The masked text decoder's context ``[B, T, C]`` for captions whose ``masked_ids`` hide
    some words (training and evaluation alike):

    - ``mask_before_encoding=false`` (the paper): the unmasked captions' token features (the
      decoder then overwrites the masked slots; the neighbours have seen the words);
    - ``masked_text_features=encoder``: a text-encoder forward of the masked captions;
    - ``masked_text_features=embeddings``: their input embeddings (no forward, no leak).
    """
    if not config.mask_before_encoding:
        return text.token_features
    masked_ids = masked_ids.to(text.ids.device)
    if config.masked_text_features == "embeddings":
        return text_encoder.input_embeddings(masked_ids, text.attention_mask)
    if config.masked_text_features != "encoder":
        raise ValueError("masked_text_features must be encoder or embeddings, got "
                         f"{config.masked_text_features!r}")
    return text_encoder.encode_ids(masked_ids, text.attention_mask,
                                   text.special_mask).token_features


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, text_encoder=None, progress: bool = True,
          log_prefix: str | None = None) -> Path:
    """Train (or resume) LG-VQ / the baseline per ``config``; returns the checkpoint path.

    progress: a tqdm bar; log_prefix: instead (or as well), print one line per metrics row.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    parallel, device = init_parallel(resolve_device(config.device))
    rows = parallel.shard(config.batch_size)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    torch.manual_seed(config.seed)  # the same initial weights on every rank

    dataset = build_dataset(config, "train")
    text_encoder = text_encoder or load_text_encoder(config.text_encoder,
                                                     max_length=config.max_text_length)
    text_encoder.to(device)
    captions = dataset_captions(dataset)  # every training caption (no image is loaded)
    if config.text_cache:
        # the frozen encoder's features of every training caption, computed once and shared
        if not parallel.main:
            parallel.barrier()  # rank 0 writes the file, the others read it
        text_cache = TextFeatureCache.build(text_encoder, captions, config.text_cache)
        if parallel.main:
            parallel.barrier()
    else:
        text_cache = TextFeatureCache(text_encoder)
    backbone = build_backbone(config)
    model = build_model(config, text_encoder, tokenizer=backbone.model,
                        captions=captions).to(device)
    if config.centre_text_targets:
        model.set_text_centre(text_cache.encode(sorted(set(captions))).global_features.mean(0))
    objective = backbone.loss.to(device)
    heads = list(model.head_parameters())
    optimizer = adam(
        [{"params": list(model.tokenizer.parameters())},
         {"params": heads, "lr": config.head_learning_rate or config.learning_rate}],
        lr=config.learning_rate, betas=tuple(config.adam_betas))
    base_rates = [group["lr"] for group in optimizer.param_groups]
    optimizers = {"model": optimizer}
    modules = {}
    if objective.discriminator is not None:
        modules["discriminator"] = objective.discriminator
        optimizers["discriminator"] = adam(
            objective.discriminator.parameters(),
            lr=config.disc_learning_rate or config.learning_rate, betas=tuple(config.adam_betas))

    start_step = 0
    if config.resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: nothing to resume, {checkpoint_path} does not exist")
    if config.resume and checkpoint_path.exists():
        check_resumable(read_checkpoint_metadata(checkpoint_path)["config"], config)
        meta = load_checkpoint(checkpoint_path, model=model, optimizers=optimizers,
                               modules=modules)
        start_step = meta["step"]
    elif checkpoint_path.exists() and parallel.main:
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or "
                              "choose another --out_dir")

    if parallel.world > 1:  # dropout differs per rank; initial weights came from the seed
        torch.manual_seed(config.seed + 7919 * parallel.rank + start_step)
    metrics_path = out_dir / "metrics.csv"
    if parallel.main:
        truncate_csv_rows(metrics_path, start_step)  # rows logged after the checkpoint are redone
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not progress or not parallel.main,
               desc="lgvq-train" if config.language_guidance else "vq-train")
    last_time, last_step = time.perf_counter(), start_step
    model.train()

    def save_interrupted(done: int) -> Path:
        return save_checkpoint(checkpoint_path, model=model, optimizers=optimizers, step=done,
                               config=config.to_dict(), modules=modules)

    for step in steps_until_interrupted(bar, config.steps, save_interrupted,
                                        enabled=parallel.world == 1):
        # the global batch, captions and masks are drawn alike on every rank; each keeps its rows
        batch = load_batch(dataset, config, step)
        text = text_cache.encode(batch.captions)
        masked_ids, masked = mask_words(text_encoder, text, config, step)
        images = batch.images[rows].to(device)
        caption_rows = caption_rows_of(torch.arange(config.batch_size)[rows],
                                       config.captions_per_image)
        text = text.index_select(caption_rows).to(device)
        masked_ids, masked = masked_ids[caption_rows], masked[caption_rows].to(device)
        context = masked_context(config, text_encoder, masked_ids.to(device), text)
        with autocast:
            z_e, zq_st, indices, vq_loss, _ = model.tokenizer.encode(images)
            reconstruction = model.tokenizer.decode(zq_st).float()
            backbone_loss, logs = objective.generator_loss(
                images, reconstruction, vq_loss, step, last_layer=model.tokenizer.last_layer)
            language = model.language_losses(zq_st, text, masked, context)
            loss = backbone_loss + language.total
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(model.parameters())
        factor = learning_rate_factor(config, step)
        for group, rate in zip(optimizer.param_groups, base_rates):
            group["lr"] = rate * factor
        optimizer.step()
        discriminator_loss = None
        if objective.discriminator_active(step):  # hinge step on real vs detached reconstructions
            with autocast:
                discriminator_loss, _ = objective.discriminator_loss(images, reconstruction, step)
            optimizers["discriminator"].zero_grad(set_to_none=True)
            discriminator_loss.backward()
            parallel.average_gradients(objective.discriminator.parameters())
            optimizers["discriminator"].step()

        done = step + 1
        if parallel.follows(done, config.checkpoint_every, config.steps):
            continue
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            throughput = (done - last_step) * config.batch_size / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            row = {"step": done, "loss": float(loss.detach()),
                   "reconstruction": float(logs["pixel_loss"]),
                   "perceptual": float(logs["perceptual_loss"]),
                   "vq": float(vq_loss.detach()),
                   "generator": float(logs["generator_loss"]),
                   "adaptive_weight": float(logs["adaptive_weight"]),
                   "discriminator": (float(discriminator_loss.detach())
                                     if discriminator_loss is not None else 0.0),
                   "gsa": float(language.global_alignment.detach()),
                   "mtp": float(language.masked_prediction.detach()),
                   "ras": float(language.relation.detach()),
                   "psnr": float(psnr(reconstruction.detach(), images).mean()),
                   "images_per_second": throughput}
            append_csv_row(metrics_path, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}",
                            img_s=f"{throughput:.0f}")
            if log_prefix is not None:
                print(f"{log_prefix}: step {done}/{config.steps} loss {row['loss']:.4f} "
                      f"psnr {row['psnr']:.1f} dB mtp {row['mtp']:.3f} ras {row['ras']:.4f} "
                      f"{throughput:.0f} img/s", flush=True)
        if done % config.sample_every == 0 or done == config.steps:
            grid = torch.cat([images[:8], reconstruction.detach()[:8]]).cpu()
            save_image_grid(grid, out_dir / f"reconstruction_{done:06d}.png", nrow=8)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(checkpoint_path, model=model, optimizers=optimizers, step=done,
                            config=config.to_dict(), modules=modules)
            parallel.barrier()
    return checkpoint_path


# ----------------------------------------------------------------------------------------------
# resuming and interrupting
# ----------------------------------------------------------------------------------------------

# What a resumed run may change: how long it runs and how often it writes, not what it trains.
RESUME_SAFE_KEYS = ("steps", "log_every", "checkpoint_every", "sample_every", "threads",
                    "out_dir", "resume")


def check_resumable(stored: dict, config: TrainConfig) -> None:
    """ValueError naming the first option that differs between the checkpoint's ``stored``
    config and ``config`` other than ``RESUME_SAFE_KEYS``. An option the checkpoint does not
    store (it predates the option) had its default value, whose behaviour it keeps."""
    current = config.to_dict()
    saved = TrainConfig.from_dict({k: v for k, v in stored.items() if k in current}).to_dict()
    for key, value in current.items():
        if key not in RESUME_SAFE_KEYS and saved[key] != value:
            raise ValueError(f"--{key}={_flag_value(value)} differs from the run being resumed "
                             f"(--{key}={_flag_value(saved[key])}); with --resume only "
                             f"{', '.join('--' + k for k in RESUME_SAFE_KEYS[:5])} may change")


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def resume_config(out_dir: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """The config that continues the run in ``out_dir``: the one stored in its checkpoint, with
    ``overrides`` (``{"steps": "100"}``) of the keys in ``RESUME_SAFE_KEYS``; any other key
    must keep its stored value (ValueError naming it). FileNotFoundError when there is no
    checkpoint to resume."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist")
    stored = dict(read_checkpoint_metadata(path)["config"])
    names = set(TrainConfig().to_dict())
    stored = {k: v for k, v in stored.items() if k in names}  # keys of older versions
    config = TrainConfig.from_dict({**stored, **(overrides or {}), "out_dir": str(out_dir),
                                    "resume": True})
    check_resumable(stored, config)
    return config


class TrainingInterrupted(Exception):
    """SIGINT (Ctrl-C) stopped training after a whole step; its checkpoint was written."""

    def __init__(self, checkpoint: Path, step: int, steps: int):
        super().__init__(f"interrupted after step {step}/{steps}; checkpoint written to "
                         f"{checkpoint}")
        self.checkpoint, self.step, self.steps = checkpoint, step, steps


def steps_until_interrupted(steps, total: int, save, *, enabled: bool = True):
    """Yield ``steps``; a SIGINT during a step lets that step finish, then ``save(done)``
    writes the checkpoint and :class:`TrainingInterrupted` is raised (a resumed run continues
    bit for bit). A second SIGINT interrupts at once (KeyboardInterrupt). The previous handler
    is back when the loop ends. ``enabled`` False (several ranks, or not the main thread):
    plain iteration, since ranks would stop at different steps."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield from steps
        return
    requested = []

    def handler(signum, frame):
        if requested:  # asked twice: stop now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        requested.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        for step in steps:
            yield step
            if requested and step + 1 < total:
                raise TrainingInterrupted(save(step + 1), step + 1, total)
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["train", "build_model", "build_backbone", "build_dataset", "batch_indices",
           "load_batch", "mask_words", "quantizer_kwargs", "step_generator", "RandomStream",
           "CHECKPOINT_NAME", "RESUME_SAFE_KEYS", "TrainingInterrupted", "resume_config",
           "check_resumable", "step_captions"]

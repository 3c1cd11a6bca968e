"""The LG-VQ training loop: one readable function, `train(config)`.

Everything that varies between steps is a pure function of (seed, step): the batch order, the
caption drawn per image and the masked words. With the model, optimizer and RNG state in the
checkpoint, a resumed run continues bit for bit like an uninterrupted one.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgvq.checkpoint import load_checkpoint, save_checkpoint
from lgvq.config import TrainConfig
from lgvq.language_guided import LGVQ, LanguageLossWeights

CHECKPOINT_NAME = "last.safetensors"
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: decorrelates (seed, step) pairs


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A torch.Generator that depends only on (seed, step, stream)."""
    value = (seed * _MIX + step * 1_000_003 + stream * 7919) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def batch_indices(seed: int, step: int, batch_size: int, dataset_size: int) -> torch.Tensor:
    """Indices of the images of ``step``: epochs are seeded permutations; the last partial batch
    of an epoch wraps into the next epoch's permutation."""
    start = step * batch_size
    epoch_first, epoch_last = start // dataset_size, (start + batch_size - 1) // dataset_size
    order = torch.cat([torch.randperm(dataset_size, generator=step_generator(seed, e, 1))
                       for e in range(epoch_first, epoch_last + 1)])
    offset = start - epoch_first * dataset_size
    return order[offset:offset + batch_size]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------------


def build_dataset(config: TrainConfig, split: str):
    from lgvq.data import build_dataset as build

    size = config.train_images if split == "train" else config.eval_images
    options = {"size": size} if config.dataset == "shapes" and size else {}
    return build(config.dataset, root=config.data_root or None, split=split,
                 image_size=config.image_size, **options)


def build_quantizer(config: TrainConfig) -> nn.Module:
    from lgvq.quantizers import ClusteredVectorQuantizer, VectorQuantizer

    if config.quantizer == "cvq":
        return ClusteredVectorQuantizer(dim=config.code_dim, codebook_size=config.codebook_size,
                                        commitment_weight=config.commitment_weight,
                                        backend=config.backend)
    learnable = config.quantizer == "learnable"
    if config.quantizer not in ("ema", "learnable"):
        raise ValueError(f"quantizer must be ema, learnable or cvq, got {config.quantizer!r}")
    return VectorQuantizer(
        dim=config.code_dim, codebook_size=config.codebook_size, decay=config.ema_decay,
        ema_update=not learnable, learnable_codebook=learnable,
        commitment_weight=config.commitment_weight,
        threshold_ema_dead_code=0.0 if learnable else config.dead_code_threshold,
        kmeans_init=not learnable, kmeans_iters=5, backend=config.backend)


def build_tokenizer(config: TrainConfig) -> nn.Module:
    from lgvq.models.backbones import BackboneConfig, Decoder, Encoder
    from lgvq.models.vqmodel import VQModel

    backbone = BackboneConfig(image_size=config.image_size, base_channels=config.base_channels,
                              channel_multipliers=config.channel_multipliers,
                              num_res_blocks=config.res_blocks, z_channels=config.code_dim)
    return VQModel(Encoder(backbone), Decoder(backbone), build_quantizer(config),
                   embed_dim=config.code_dim)


def build_model(config: TrainConfig, text_encoder) -> LGVQ:
    tokenizer = build_tokenizer(config)
    grid = config.image_size // 2 ** (len(config.channel_multipliers) - 1)
    weights = LanguageLossWeights(alpha=config.alpha, beta=config.beta, gamma=config.gamma)
    return LGVQ(tokenizer, code_dim=config.code_dim, num_tokens=grid * grid,
                text_width=text_encoder.width, global_width=text_encoder.global_dim,
                max_length=text_encoder.max_length,
                token_embedding=text_encoder.token_embedding, weights=weights,
                language_guidance=config.language_guidance, backend=config.backend)


# ----------------------------------------------------------------------------------------------
# one batch
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    captions: list[str]  # one drawn caption per image


def load_batch(dataset, config: TrainConfig, step: int) -> Batch:
    from lgvq.data import draw_one_caption_per_image

    indices = batch_indices(config.seed, step, config.batch_size, len(dataset))
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([item["image"] for item in items])
    captions = draw_one_caption_per_image([item["captions"] for item in items],
                                          generator=step_generator(config.seed, step, 2))
    return Batch(images, captions)


def mask_words(text_encoder, text, config: TrainConfig, step: int):
    """The masked slots of this step: one ratio per batch, each real word masked with it."""
    from lgvq.alignment import draw_mask_ratio

    generator = step_generator(config.seed, step, 3)
    ratio = draw_mask_ratio(generator)
    masked_ids, masked = text_encoder.mask_tokens(text.ids.cpu(), text.attention_mask.cpu(),
                                                  text.special_mask.cpu(), ratio, generator)
    return masked_ids, masked


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, text_encoder=None, progress: bool = True) -> Path:
    """Train (or resume) LG-VQ / the baseline per ``config``; returns the checkpoint path."""
    from tqdm import tqdm

    from lgvq.evaluation.report import save_image_grid
    from lgvq.text import TextFeatureCache, load_text_encoder

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    torch.manual_seed(config.seed)

    dataset = build_dataset(config, "train")
    text_encoder = text_encoder or load_text_encoder(config.text_encoder,
                                                     max_length=config.max_text_length)
    text_encoder.to(device)
    if config.text_cache and config.dataset == "shapes":
        # the frozen encoder's features of every training caption, computed once and shared
        captions = [c for i in range(len(dataset)) for c in dataset[i]["captions"]]
        text_cache = TextFeatureCache.build(text_encoder, captions, config.text_cache)
    else:
        text_cache = TextFeatureCache(text_encoder)
    model = build_model(config, text_encoder).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 betas=tuple(config.adam_betas))
    optimizers = {"model": optimizer}

    start_step = 0
    if config.resume and checkpoint_path.exists():
        meta = load_checkpoint(checkpoint_path, model=model, optimizers=optimizers)
        start_step = meta["step"]
    elif checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or "
                              "choose another --out_dir")

    metrics_path = out_dir / "metrics.csv"
    _truncate_csv(metrics_path, start_step)  # rows logged after the checkpoint are redone
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not progress, desc="lgvq-train" if config.language_guidance else "vq-train")
    last_time, last_step = time.perf_counter(), start_step
    model.train()
    for step in bar:
        batch = load_batch(dataset, config, step)
        images = batch.images.to(device)
        text = text_cache.encode(batch.captions, device=device)
        masked_ids, masked = mask_words(text_encoder, text, config, step)
        masked = masked.to(device)
        masked_text = None
        if config.mask_before_encoding:
            masked_text = text_encoder.encode_ids(masked_ids.to(device), text.attention_mask,
                                                  text.special_mask)
        with autocast:
            z_e, zq_st, indices, vq_loss, _ = model.tokenizer.encode(images)
            reconstruction = model.tokenizer.decode(zq_st)
            reconstruction_loss = F.l1_loss(reconstruction.float(), images)
            language = model.language_losses(zq_st, text, masked, masked_text)
            loss = reconstruction_loss + vq_loss + language.total
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            throughput = (done - last_step) * config.batch_size / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            row = {"step": done, "loss": float(loss.detach()),
                   "reconstruction": float(reconstruction_loss.detach()),
                   "vq": float(vq_loss.detach()),
                   "gsa": float(language.global_alignment.detach()),
                   "mtp": float(language.masked_prediction.detach()),
                   "ras": float(language.relation.detach()),
                   "psnr": float(_psnr(reconstruction.detach().float(), images)),
                   "images_per_second": throughput}
            _append_csv(metrics_path, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}",
                            img_s=f"{throughput:.0f}")
        if done % config.sample_every == 0 or done == config.steps:
            grid = torch.cat([images[:8], reconstruction.detach().float()[:8]]).cpu()
            save_image_grid(grid, out_dir / f"reconstruction_{done:06d}.png", nrow=8)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(checkpoint_path, model=model, optimizers=optimizers, step=done,
                            config=config.to_dict())
    return checkpoint_path


def _psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = ((reconstruction.clamp(-1, 1) - target) ** 2).mean()
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep only the rows with step <= last_step (all of them are rewritten atomically)."""
    if not path.exists():
        return
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    kept = [row for row in rows if int(row["step"]) <= last_step]
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as stream:
        if kept:
            writer = csv.DictWriter(stream, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)
    os.replace(temporary, path)
    if not kept:
        path.unlink()


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        stream.flush()
        os.fsync(stream.fileno())


__all__ = ["train", "build_model", "batch_indices", "step_generator", "CHECKPOINT_NAME"]

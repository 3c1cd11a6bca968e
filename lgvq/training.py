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
from torch import nn

from lgvq.checkpoint import load_checkpoint, save_checkpoint
from lgvq.config import TrainConfig
from lgvq.language_guided import LGVQ, LanguageLossWeights
from lgvq_kernels import resolve_device

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


def build_backbone(config: TrainConfig):
    """The tokenizer and its objective (lgvq.models.build_vqvae / build_vqgan, a
    ``BuiltVQModel(model, loss)``): L1 + VQ for ``vqvae``; for ``vqgan`` also LPIPS (when
    ``lpips_weights`` exists locally, else a warning) and the adaptive-weight hinge PatchGAN
    term from step ``disc_start`` on."""
    from lgvq.models import BackboneConfig, VQModelConfig, build_vqgan, build_vqvae

    builders = {"vqvae": build_vqvae, "vqgan": build_vqgan}
    if config.backbone not in builders:
        raise ValueError(f"backbone must be vqvae or vqgan, got {config.backbone!r}")
    backbone = BackboneConfig(image_size=config.image_size, base_channels=config.base_channels,
                              channel_multipliers=config.channel_multipliers,
                              num_res_blocks=config.res_blocks, z_channels=config.code_dim)
    vq_config = VQModelConfig(backbone=backbone, embed_dim=config.code_dim,
                              codebook_size=config.codebook_size,
                              lpips_weights_path=config.lpips_weights or None,
                              disc_start=config.disc_start, disc_weight=config.disc_weight,
                              disc_layers=config.disc_layers,
                              disc_channels=config.disc_channels)
    return builders[config.backbone](vq_config, quantizer=lambda: build_quantizer(config))


def build_model(config: TrainConfig, text_encoder, tokenizer: nn.Module | None = None) -> LGVQ:
    """LG-VQ (or the baseline) around ``tokenizer`` (default: ``build_backbone(config).model``)."""
    tokenizer = build_backbone(config).model if tokenizer is None else tokenizer
    grid = config.image_size // 2 ** (len(config.channel_multipliers) - 1)
    weights = LanguageLossWeights(alpha=config.alpha, beta=config.beta, gamma=config.gamma,
                                  temperature=config.temperature)
    return LGVQ(tokenizer, code_dim=config.code_dim, num_tokens=grid * grid,
                text_width=text_encoder.width, global_width=text_encoder.global_dim,
                max_length=text_encoder.max_length,
                token_embedding=text_encoder.token_embedding, weights=weights,
                language_guidance=config.language_guidance, backend=config.backend,
                visual_width=config.visual_width)


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
# data parallel (torchrun)
# ----------------------------------------------------------------------------------------------


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``."""
        if batch_size % self.world:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                             f"processes ({self.world})")
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def average_gradients(self, parameters) -> None:
        """Average the gradients of ``parameters`` over ranks with one flat all-reduce (a
        parameter without a gradient on this rank contributes zeros, so every rank sends the
        same layout)."""
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        parameters = [p for p in parameters if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in parameters]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)


def init_parallel(device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    on CUDA (one GPU per local rank). A single process needs no launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, text_encoder=None, progress: bool = True,
          log_prefix: str | None = None) -> Path:
    """Train (or resume) LG-VQ / the baseline per ``config``; returns the checkpoint path.

    progress: a tqdm bar; log_prefix: instead (or as well), print one line per metrics row.
    """
    from tqdm import tqdm

    from lgvq.evaluation.metrics import psnr
    from lgvq.evaluation.report import save_image_grid
    from lgvq.text import TextFeatureCache, load_text_encoder

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
    if config.text_cache and config.dataset == "shapes":
        # the frozen encoder's features of every training caption, computed once and shared
        captions = [c for i in range(len(dataset)) for c in dataset[i]["captions"]]
        if not parallel.main:
            parallel.barrier()  # rank 0 writes the file, the others read it
        text_cache = TextFeatureCache.build(text_encoder, captions, config.text_cache)
        if parallel.main:
            parallel.barrier()
    else:
        text_cache = TextFeatureCache(text_encoder)
    backbone = build_backbone(config)
    model = build_model(config, text_encoder, tokenizer=backbone.model).to(device)
    objective = backbone.loss.to(device)
    heads = list(model.head_parameters())
    optimizer = torch.optim.Adam(
        [{"params": list(model.tokenizer.parameters())},
         {"params": heads, "lr": config.head_learning_rate or config.learning_rate}],
        lr=config.learning_rate, betas=tuple(config.adam_betas))
    optimizers = {"model": optimizer}
    modules = {}
    if objective.discriminator is not None:
        modules["discriminator"] = objective.discriminator
        optimizers["discriminator"] = torch.optim.Adam(
            objective.discriminator.parameters(),
            lr=config.disc_learning_rate or config.learning_rate, betas=tuple(config.adam_betas))

    start_step = 0
    if config.resume and checkpoint_path.exists():
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
        _truncate_csv(metrics_path, start_step)  # rows logged after the checkpoint are redone
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not progress or not parallel.main,
               desc="lgvq-train" if config.language_guidance else "vq-train")
    last_time, last_step = time.perf_counter(), start_step
    model.train()
    for step in bar:
        # the global batch, captions and masks are drawn alike on every rank; each keeps its rows
        batch = load_batch(dataset, config, step)
        text = text_cache.encode(batch.captions)
        masked_ids, masked = mask_words(text_encoder, text, config, step)
        images = batch.images[rows].to(device)
        text = text.index_select(torch.arange(config.batch_size)[rows]).to(device)
        masked_ids, masked = masked_ids[rows], masked[rows].to(device)
        masked_text = None
        if config.mask_before_encoding:
            masked_text = text_encoder.encode_ids(masked_ids.to(device), text.attention_mask,
                                                  text.special_mask)
        with autocast:
            z_e, zq_st, indices, vq_loss, _ = model.tokenizer.encode(images)
            reconstruction = model.tokenizer.decode(zq_st).float()
            backbone_loss, logs = objective.generator_loss(
                images, reconstruction, vq_loss, step, last_layer=model.tokenizer.last_layer)
            language = model.language_losses(zq_st, text, masked, masked_text)
            loss = backbone_loss + language.total
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(model.parameters())
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
        if not parallel.main:
            if done % config.checkpoint_every == 0 or done == config.steps:
                parallel.barrier()  # nobody moves on before the checkpoint is written
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
            _append_csv(metrics_path, row)
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


__all__ = ["train", "build_model", "build_backbone", "batch_indices", "step_generator",
           "CHECKPOINT_NAME", "Parallel", "init_parallel"]

"""The generation tasks on a frozen tokenizer's codes and their training loop.

Tasks (``DownstreamConfig.task``):

* ``generate`` — unconditional generation: a causal transformer over the raster-order codes
  after one start token (the taming transformer's setting).
* ``complete`` — image completion: the same model, evaluated by keeping the upper
  ``completion_rows`` rows of a held-out image's codes and sampling the rest (PSNR of the lower
  half against the held-out image).
* ``t2i`` — text-to-image with a MaskGIT-style masked-token generator: a bidirectional
  transformer cross-attending to the frozen text encoder's token features, trained to predict
  a cosine-scheduled random subset of masked codes, decoded in ``maskgit_steps`` parallel
  steps, with optional classifier-free guidance (the text is replaced by a learned null token
  with probability ``condition_dropout`` in training). MaskGIT rather than the paper's
  VQ-Diffusion: both are discrete non-autoregressive generators trained to undo token
  corruption, but VQ-Diffusion's mask-and-replace chain runs ~100 denoising steps at sampling
  and trains on a 100-step transition schedule, where MaskGIT decodes in 8 steps with one
  masking ratio per example; on 2 CPU cores that is the difference between a text-to-image run
  that fits the demo's minutes and one that does not.
* ``semantic`` — semantic synthesis: the causal transformer with a prefix of one label per code
  cell (the segmentation map at code resolution), as taming's S-FLCKR conditioning. On
  captioned shapes the label of a cell is the (colour, shape) class of the object covering at
  least a quarter of it (the renderer's exact ``object_masks``), else background.

The loop follows ``lgvq.training``: a config dataclass with ``--key=value`` overrides, batches and
masks pure functions of (seed, step), atomic checkpoints with the optimizer and RNG state (exact
resume), metrics.csv and a progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from lgvq.data_parallel import init_parallel
from lgvq.config import _coerce
from lgvq.data import COLOUR_NAMES, SHAPE_NAMES, SceneAttributes, draw_one_caption_per_image
from lgvq.data.shapes.rendering import object_masks
from lgvq.downstream.codes import CodeSplit, FrozenTokenizer, encode_split, load_tokenizer
from lgvq.downstream.transformer import CodeTransformer, TransformerShape, cosine_mask_ratio
from lgvq.files import append_csv_row, truncate_csv_rows
from lgvq.text import TextFeatureCache, caption_set_fingerprint
from lgvq.training import RandomStream, batch_indices, step_generator
from lgvq_kernels import resolve_device

GENERATION_TASKS = ("generate", "complete", "t2i", "semantic")
UNDERSTANDING_TASKS = ("caption", "vqa", "ground")  # lgvq.downstream.understanding
TASKS = GENERATION_TASKS + UNDERSTANDING_TASKS
CHECKPOINT_NAME = "last.safetensors"
LABEL_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPE_NAMES)  # background + (colour, shape)
_LABEL_COVERAGE = 0.25  # an object labels a code cell it covers at least this much of


@dataclass
class DownstreamConfig:
    task: str = "generate"  # generate | complete | t2i | semantic | caption | vqa | ground
    tokenizer: str = ""  # an `lgvq train` checkpoint (last.safetensors)
    out_dir: str = "runs/downstream/run"  # checkpoint, metrics.csv, grids, report.md
    cache_dir: str = "runs/downstream/cache"  # encoded codes and text features ("" = none)
    train_images: int = 1024  # items of the training split encoded (0 = a whole folder set)
    eval_images: int = 64  # held-out items (the validation split) scored (0 = a whole folder set)
    # --- model ------------------------------------------------------------------------------
    width: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    embedding: str = "codebook"  # codebook (frozen codebook -> Linear, default) | learned
    # --- optimisation -----------------------------------------------------------------------
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3  # AdamW, betas (0.9, 0.95), linear warm-up, then constant
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    # --- task options -----------------------------------------------------------------------
    completion_rows: int = 0  # rows of codes kept for completion (0 = the upper half)
    condition_dropout: float = 0.1  # t2i: P(text -> null token) in training (for guidance)
    guidance_scale: float = 0.0  # t2i: classifier-free guidance at sampling (0 = off)
    maskgit_steps: int = 8  # t2i: parallel decoding steps
    label_maps: str = ""  # semantic on other data sets: a folder of <split>/<i>.png label maps
    # (pixel value = class, the i-th item of the split); captioned shapes need none
    label_classes: int = 0  # classes of those maps (0 = captioned shapes' 41)
    text_vocab: str = "data"  # caption/vqa/ground: the text encoder's WordPiece ids seen in the
    # training texts ("data") or its whole vocabulary ("full")
    text_length: int = 40  # caption/vqa/ground: text tokens per example (captions: with BOS/EOS)
    beam_size: int = 3  # caption: beam search width at evaluation (greedy is scored beside it)
    box_head: str = "pointer"  # ground: pointer (centre read off the code cells) | regress
    meteor: bool = True  # caption: METEOR (a Java process per score) for beam and chance
    questions_per_image: int = 3  # vqa on captioned shapes: questions drawn per image
    qa_folder: str = ""  # vqa on real data: a folder with train.jsonl, val.jsonl (COCO-QA-style)
    ref_folder: str = ""  # ground on real data: the same with expressions and boxes (RefCOCO)
    # --- sampling and evaluation ------------------------------------------------------------
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    samples: int = 64  # generated images scored (at most eval_images for conditional tasks)
    fid_weights: str = ""  # a local Inception weights file for FID (torchmetrics); "" = no FID
    # --- machinery --------------------------------------------------------------------------
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    log_every: int = 50
    checkpoint_every: int = 250
    resume: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DownstreamConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        config = cls(**{k: _coerce(fields[k], v) for k, v in values.items()})
        config.check()
        return config

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        for name in ("steps", "batch_size", "width", "layers", "heads", "maskgit_steps",
                     "log_every", "checkpoint_every", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        if self.eval_images < 0 or self.train_images < 0:
            raise ValueError("--train_images and --eval_images must be >= 0 (0 = a whole folder "
                             f"set), got {self.train_images}, {self.eval_images}")
        if bool(self.label_maps) != (self.label_classes > 0):
            raise ValueError("--label_maps and --label_classes go together (got "
                             f"{self.label_maps!r}, {self.label_classes})")
        for name in ("text_length", "beam_size", "questions_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        if self.text_length < 3:
            raise ValueError(f"--text_length must be >= 3 ([BOS] a word [EOS]), got "
                             f"{self.text_length}")
        if self.box_head not in ("pointer", "regress"):
            raise ValueError(f"--box_head must be pointer or regress, got {self.box_head!r}")
        if self.text_vocab not in ("data", "full"):
            raise ValueError(f"--text_vocab must be data or full, got {self.text_vocab!r}")
        for name, task in (("qa_folder", "vqa"), ("ref_folder", "ground")):
            if getattr(self, name) and self.task != task:
                raise ValueError(f"--{name} is for the {task} task, not {self.task}")
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"--condition_dropout must be in [0, 1), got "
                             f"{self.condition_dropout!r}")


# ----------------------------------------------------------------------------------------------
# conditions
# ----------------------------------------------------------------------------------------------


def scene_label_grid(scene: SceneAttributes, image_size: int, grid: int) -> torch.Tensor:
    """int64 ``[grid, grid]``: per code cell 0 (background) or 1 + colour * 5 + shape of the
    object covering at least a quarter of the cell (objects never share a cell of the 3x3
    layout; at 8x8 codes two objects can touch one code cell: the larger cover wins)."""
    masks = object_masks(scene, image_size)  # [n, S, S]
    labels = torch.zeros(grid, grid, dtype=torch.long)
    if not len(masks):
        return labels
    cell = image_size // grid
    coverage = masks.reshape(len(masks), grid, cell, grid, cell).mean(axis=(2, 4))  # [n, g, g]
    best = coverage.argmax(0)
    classes = np.array([1 + COLOUR_NAMES.index(o.colour) * len(SHAPE_NAMES)
                        + SHAPE_NAMES.index(o.shape) for o in scene.objects])
    chosen = np.where(coverage.max(0) >= _LABEL_COVERAGE, classes[best], 0)
    return torch.from_numpy(chosen).long()


def label_grids(split: CodeSplit, image_size: int,
                config: DownstreamConfig) -> torch.Tensor:
    """int64 ``[N, h * w]``: the segmentation map of every item at code resolution (captioned
    shapes: from the exact scenes; otherwise from ``config.label_maps``)."""
    grid = split.grid[0]
    if config.label_maps:
        return torch.stack([folder_label_grid(config, json.loads(split.key)["split"], index,
                                              image_size, grid).reshape(-1)
                            for index in range(len(split))])
    if split.attributes is None:
        raise ValueError("semantic synthesis needs segmentation maps: captioned shapes give "
                         "them exactly; other data sets need --label_maps=<folder of "
                         "<split>/<i>.png> and --label_classes")
    return torch.stack([scene_label_grid(s, image_size, grid).reshape(-1)
                        for s in split.attributes])


def folder_label_grid(config: DownstreamConfig, split: str, index: int, image_size: int,
                      grid: int) -> torch.Tensor:
    """The label map ``<label_maps>/<split>/<index>.png`` (one class per pixel, resized and
    centre-cropped like the images, nearest neighbour) as the majority class per code cell."""
    from PIL import Image, ImageOps

    path = Path(config.label_maps) / split / f"{index}.png"
    if not path.is_file():
        raise FileNotFoundError(f"--label_maps: {path} not found (one <i>.png per item)")
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I"):
            raise ValueError(f"--label_maps: {path} must be a one-channel label image, got "
                             f"mode {image.mode}")
        labels = np.asarray(ImageOps.fit(image, (image_size, image_size),
                                         method=Image.Resampling.NEAREST)).astype(np.int64)
    if labels.max() >= config.label_classes:
        raise ValueError(f"--label_maps: {path} has class {labels.max()} but --label_classes="
                         f"{config.label_classes}")
    cell = image_size // grid
    cells = labels.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    majority = [np.bincount(values, minlength=config.label_classes).argmax() for values in cells]
    return torch.tensor(majority, dtype=torch.long).reshape(grid, grid)


def positional_captions(split: CodeSplit) -> list[str]:
    """One caption per item for scoring text-to-image: on captioned shapes the template that
    names every object's colour, shape and position (the judge checks all three), else the
    first caption."""
    if split.attributes is None:
        return [options[0] for options in split.captions]
    from lgvq.data import caption_for

    return [caption_for(scene, 1) for scene in split.attributes]  # _template_list_with_positions


# ----------------------------------------------------------------------------------------------
# the model of a task and its loss
# ----------------------------------------------------------------------------------------------


def build_task_model(config: DownstreamConfig, tokenizer: FrozenTokenizer) -> CodeTransformer:
    if config.task in UNDERSTANDING_TASKS:
        from lgvq.downstream.understanding import build_understanding_model

        return build_understanding_model(config, tokenizer)
    length = tokenizer.grid * tokenizer.grid
    prefix_length, condition_vocab, context_width = 1, 1, 0
    if config.task == "semantic":
        prefix_length, condition_vocab = length, config.label_classes or LABEL_CLASSES
    elif config.task == "t2i":
        prefix_length, context_width = 0, tokenizer.text_encoder.width
    shape = TransformerShape(codebook_size=tokenizer.codebook_size, length=length,
                             prefix_length=prefix_length, condition_vocab=condition_vocab,
                             width=config.width, layers=config.layers, heads=config.heads,
                             dropout=config.dropout, causal=config.task != "t2i",
                             context_width=context_width)
    codebook = tokenizer.codebook() if config.embedding == "codebook" else None
    return CodeTransformer(shape, codebook, embedding=config.embedding)


@dataclass
class TaskData:
    """A split ready for a task: sequences, conditions and (t2i) the text features."""

    split: CodeSplit | None  # None: understanding on a folder of its own (--qa/ref_folder)
    sequences: torch.Tensor  # int64 [N, L] (understanding: one row per example)
    prefix: torch.Tensor | None  # int64 [N, P] (None for t2i; understanding: text tokens)
    text: TextFeatureCache | None = None
    targets: torch.Tensor | None = None  # vqa: answer classes [N]; ground: boxes [N, 4]
    examples: object = None  # understanding: the split's Examples
    spec: object = None  # understanding: its TaskSpec (text vocabulary, answers)


def task_data(config: DownstreamConfig, tokenizer: FrozenTokenizer, split: str) -> TaskData:
    """The ``TaskData`` of ``split`` ("train" or "val") for any task."""
    if config.task in UNDERSTANDING_TASKS:
        from lgvq.downstream.understanding import prepare_understanding

        return prepare_understanding(config, tokenizer, split)
    images = config.train_images if split == "train" else config.eval_images
    return prepare_data(config, tokenizer,
                        encode_split(tokenizer, split, images, code_cache_dir(config)))


def prepare_data(config: DownstreamConfig, tokenizer: FrozenTokenizer,
                 split: CodeSplit) -> TaskData:
    """Sequences and conditions of ``split`` for the task; for t2i the text features of every
    caption of the split, computed once and cached in ``cache_dir`` (keyed by the text encoder
    and the caption list, so tokenizers trained on the same data share them)."""
    sequences = split.sequences()
    prefix, text = None, None
    if config.task == "semantic":
        prefix = label_grids(split, tokenizer.config.image_size, config)
    elif config.task in ("generate", "complete"):
        prefix = torch.zeros(len(split), 1, dtype=torch.long)  # the start token
    else:
        captions = sorted({c for options in split.captions for c in options})
        path = None
        if config.cache_dir:
            digest = caption_set_fingerprint(tokenizer.text_encoder, captions)[:20]
            path = str(Path(config.cache_dir) / f"text-{digest}.safetensors")
        text = TextFeatureCache.build(tokenizer.text_encoder, captions, path)
    return TaskData(split, sequences, prefix, text)


def task_loss(config: DownstreamConfig, model: CodeTransformer, data: TaskData,
              rows: torch.Tensor, step: int, device: torch.device) -> torch.Tensor:
    """Cross-entropy of one batch (``rows`` of ``data``); every random draw is a function of
    (seed, step)."""
    if config.task in UNDERSTANDING_TASKS:
        from lgvq.downstream.understanding import understanding_loss

        return understanding_loss(config, model, data, rows, device)
    codes = data.sequences[rows].to(device)
    if model.shape.causal:
        logits = model(data.prefix[rows].to(device), codes)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    generator = step_generator(config.seed, step, RandomStream.WORD_MASKS)
    captions = draw_one_caption_per_image([data.split.captions[int(i)] for i in rows],
                                          generator=step_generator(config.seed, step,
                                                                   RandomStream.CAPTION_DRAW))
    context, context_mask = text_context(data.text, captions, device)
    masked = maskgit_training_mask(codes.shape, generator).to(device)
    dropped = (torch.rand(len(rows), generator=generator) < config.condition_dropout).to(device)
    if bool(dropped.any()):
        null, null_mask = model.null_context_like(context, context_mask)
        context = torch.where(dropped[:, None, None], null, context)
        context_mask = torch.where(dropped[:, None], null_mask, context_mask)
    logits = model(None, codes.masked_fill(masked, model.mask_id), context, context_mask)
    return F.cross_entropy(logits[masked], codes[masked])


def maskgit_training_mask(shape, generator: torch.Generator) -> torch.Tensor:
    """bool ``[B, L]``: per row a cosine-schedule ratio r = cos(pi/2 u), u ~ U(0, 1), and the
    ceil(r L) positions of lowest random score masked (at least one)."""
    batch, length = shape
    ratio = cosine_mask_ratio(torch.rand(batch, generator=generator))
    count = torch.clamp((ratio * length).ceil().long(), 1, length)
    scores = torch.rand(batch, length, generator=generator)
    ranks = scores.argsort(1).argsort(1)
    return ranks < count[:, None]


def text_context(text: TextFeatureCache, captions: list[str], device):
    features = text.encode(captions)
    return features.token_features.to(device), features.attention_mask.to(device)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def _learning_rate(config: DownstreamConfig, step: int) -> float:
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    return config.learning_rate * warmup


def build_optimizer(config: DownstreamConfig, model: CodeTransformer) -> torch.optim.Optimizer:
    # the multi-tensor update on CPU too (PyTorch's default on CUDA only): bitwise the
    # per-parameter loop's values (tests/test_training_optimizers.py), fewer small kernels
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95),
                             weight_decay=config.weight_decay, foreach=True)


def code_cache_dir(config: DownstreamConfig) -> str | None:
    return config.cache_dir or None


def train_task(config: DownstreamConfig, *, tokenizer: FrozenTokenizer | None = None,
               progress: bool = True, log_prefix: str | None = None) -> Path:
    """Train (or resume) the task's model on the tokenizer's codes; returns the checkpoint.

    Under torchrun (``WORLD_SIZE`` > 1) it runs data parallel like ``lgvq train``
    (``lgvq.data_parallel``): each rank takes its rows of the global batch, gradients are
    averaged, rank 0 encodes the caches first and writes checkpoints and metrics. A loss that
    is a mean over equal counts per row (codes, answers, boxes) then trains exactly like one
    process on the whole batch; caption tokens and t2i's masked codes are per-rank means.
    """
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    parallel, device = init_parallel(resolve_device(config.device))
    shard = parallel.shard(config.batch_size)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer, device=device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if checkpoint_path.exists() and not config.resume:
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or "
                              "choose another --out_dir")
    if not parallel.main:
        parallel.barrier()  # rank 0 encodes and writes the caches, the others read them
    data = task_data(config, tokenizer, "train")
    if parallel.main:
        parallel.barrier()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_task_model(config, tokenizer).to(device)
    optimizer = build_optimizer(config, model)
    start_step = 0
    if checkpoint_path.exists():
        check_same_tokenizer(checkpoint_path, tokenizer)
        start_step = load_checkpoint(checkpoint_path, model=model,
                                     optimizers={"model": optimizer})["step"]
    if parallel.world > 1:  # dropout differs per rank; initial weights came from the seed
        torch.manual_seed(config.seed + 7919 * parallel.rank + start_step)
    metrics_path = out_dir / "metrics.csv"
    if parallel.main:
        truncate_csv_rows(metrics_path, start_step)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               disable=not progress or not parallel.main, desc=f"downstream-{config.task}")
    last_time, last_step = time.perf_counter(), start_step
    model.train()
    for step in bar:
        rows = batch_indices(config.seed, step, config.batch_size, len(data.sequences))[shard]
        loss = task_loss(config, model, data, rows, step, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parallel.average_gradients(model.parameters())
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        optimizer.step()
        done = step + 1
        if parallel.follows(done, config.checkpoint_every, config.steps):
            continue
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            codes_per_second = ((done - last_step) * config.batch_size * model.shape.length
                                / max(now - last_time, 1e-9))
            last_time, last_step = now, done
            row = {"step": done, "loss": float(loss.detach()),
                   "learning_rate": _learning_rate(config, step),
                   "codes_per_second": codes_per_second}
            append_csv_row(metrics_path, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", codes_s=f"{codes_per_second:.0f}")
            if log_prefix is not None:
                print(f"{log_prefix}: step {done}/{config.steps} loss {row['loss']:.4f} "
                      f"{codes_per_second:.0f} codes/s", flush=True)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(checkpoint_path, model=model, optimizers={"model": optimizer},
                            step=done, config=config.to_dict(),
                            extra={"tokenizer_digest": tokenizer.digest})
            parallel.barrier()
    return checkpoint_path


def load_task_model(path: str | Path, config: DownstreamConfig, tokenizer: FrozenTokenizer,
                    device) -> CodeTransformer:
    """The trained model of a task checkpoint (no optimizer, RNG untouched)."""
    model = build_task_model(config, tokenizer).to(device)
    check_same_tokenizer(path, tokenizer)
    load_checkpoint(path, model=model, restore_rng=False)
    return model.eval()


def check_same_tokenizer(path: str | Path, tokenizer: FrozenTokenizer) -> None:
    """ValueError (one line) when the task checkpoint at ``path`` was trained on the codes of
    another tokenizer checkpoint than ``tokenizer`` (their sha256 differ): a retrained tokenizer
    makes other codes, and the task model would read them wrongly."""
    digest = read_checkpoint_metadata(path)["extra"].get("tokenizer_digest")
    if digest not in (None, tokenizer.digest):
        raise ValueError(f"{path} was trained on another tokenizer's codes than --tokenizer "
                         f"{tokenizer.path} (it changed since): remove that run or choose "
                         "another --out_dir")


__all__ = ["DownstreamConfig", "GENERATION_TASKS", "LABEL_CLASSES", "TASKS", "TaskData",
           "UNDERSTANDING_TASKS", "task_data", "build_task_model",
           "check_same_tokenizer", "label_grids", "load_task_model", "maskgit_training_mask", "positional_captions",
           "prepare_data", "scene_label_grid", "task_loss", "train_task"]

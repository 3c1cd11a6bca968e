"""Typed training configuration with presets and ``--key=value`` overrides. The whole config is
saved into every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lgvq.quantizers.build import TAMING_LEGACY_WEIGHTS


@dataclass
class TrainConfig:
    # --- data -----------------------------------------------------------------------------
    dataset: str = "shapes"  # shapes | jsonl | cub | coco | celeba
    data_root: str = ""  # folder (or manifest) of a real data set; unused for shapes
    image_size: int = 32  # pixels per side after resize/crop
    train_images: int = 2048  # size of the training split (shapes); 0 = the whole folder set
    eval_images: int = 256  # held-out images used by evaluation
    object_radii: tuple[float, ...] = (0.13, 0.075)  # captioned shapes: (large, small) object
    # radius as fractions of the image side
    # --- tokenizer --------------------------------------------------------------------------
    backbone: str = "vqvae"  # vqvae | vqgan
    base_channels: int = 16  # channels of the first encoder level
    channel_multipliers: tuple[int, ...] = (1, 2, 2)  # one per level; len - 1 downsamplings
    res_blocks: int = 1  # residual blocks per level
    code_dim: int = 32  # D: width of the codes
    codebook_size: int = 128  # K
    quantizer: str = "ema"  # ema | learnable | cvq (see lgvq.quantizers.build_quantizer)
    commitment_weight: float = 0.25  # weight of |x - sg(e)|^2 (beta of the VQ-VAE paper)
    codebook_weight: float = 1.0  # weight of |sg(x) - e|^2 (learnable and cvq codebooks)
    ema_decay: float = 0.95  # EMA decay of the codebook (ema quantizer)
    dead_code_threshold: float = 0.5  # EMA count under which a code is re-seeded from the batch
    disc_start: int = 10_000  # step at which the PatchGAN loss starts (vqgan)
    disc_weight: float = 0.8  # weight of the adaptive GAN term (vqgan)
    lpips_weights: str = ""  # local LPIPS weights file (vqgan); empty = perceptual term off
    disc_channels: int = 64  # width of the PatchGAN's first conv (vqgan)
    disc_layers: int = 3  # stride-2 convs of the PatchGAN (vqgan)
    disc_learning_rate: float = 0.0  # discriminator Adam learning rate (0 = learning_rate)
    pixel_loss: str = "l1"  # l1 (VQGAN, taming) | mse (the classic VQ-VAE loss)
    # --- language guidance -----------------------------------------------------------------
    language_guidance: bool = True  # False: the plain baseline (heads trained as probes)
    alpha: float = 1e-3  # weight of global semantic alignment (InfoNCE)
    beta: float = 1e-2  # weight of masked text prediction
    gamma: float = 1e-4  # weight of relationship alignment
    label_smoothing: float = 0.1  # of the masked-word cross-entropy (the public code's)
    text_encoder: str = "minilm"  # minilm, or a local CLIP/BERT folder
    max_text_length: int = 30  # text tokens kept per caption
    mask_before_encoding: bool = False  # mask words, then encode (honest) vs paper behaviour
    masked_text_features: str = "encoder"  # with mask_before_encoding, the decoder's context:
    # encoder (a text-encoder forward of the masked captions every step) | embeddings (the
    # encoder's input embeddings of the masked captions: no forward, nothing leaks)
    mask_words: str = "all"  # words masked in training: all | attributes (captioned shapes)
    word_vocabulary: str = "data"  # masked-word head over: data (ids of the training captions)
    # | full (the text encoder's whole vocabulary, for open-vocabulary data)
    centre_text_targets: bool = False  # subtract the training captions' mean global feature
    # from the InfoNCE text targets (and retrieval's), so that they differ by content
    text_cache: str = ""  # safetensors file of pre-encoded training captions (shared by runs)
    visual_width: int = 0  # width of the visual-token encoder (0 = code_dim, as in the paper)
    decoder_width: int = 0  # width of the masked text decoder (0 = the text width, the paper's)
    decoder_heads: int = 1  # attention heads of the masked text decoder (1 in the paper's code)
    decoder_dropout: float = 0.1  # dropout in the masked text decoder (0.1 in the paper's code)
    decoder_layers: int = 2  # layers of the masked text decoder (2 in the paper's code)
    captions_per_image: int = 1  # captions drawn per image per step (1 in the paper): the
    # masked-word head trains on all of them, global and relation alignment on the first
    temperature: float = 1.0  # InfoNCE temperature of global semantic alignment (1 in the paper)
    # --- optimisation -----------------------------------------------------------------------
    steps: int = 400  # optimisation steps
    batch_size: int = 16  # images per step
    learning_rate: float = 4e-4  # Adam learning rate of the tokenizer
    head_learning_rate: float = 0.0  # Adam learning rate of the language heads (0 = learning_rate)
    learning_rate_schedule: str = "constant"  # constant (the paper) | cosine (linear warm-up
    # over warmup_steps, then a cosine decay to 0 at the last step)
    warmup_steps: int = 0  # steps of linear warm-up (cosine schedule)
    adam_betas: tuple[float, float] = (0.5, 0.9)  # Adam (beta1, beta2) as in the paper
    seed: int = 0  # seeds data order, caption draws, masks and initialisation
    amp: bool = False  # bf16 autocast where the device supports it
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # lgvq kernel backend (auto | reference | native | triton)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # --- output -----------------------------------------------------------------------------
    out_dir: str = "runs/shapes"  # checkpoints, metrics.csv, sample grids
    log_every: int = 20  # steps between metric rows
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    sample_every: int = 200  # steps between reconstruction grids
    resume: bool = False  # continue from out_dir/last.safetensors if it exists
    preset: str = field(default="shapes")  # the preset these values started from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(fields[k], v) for k, v in values.items()})


# the paper's settings (GPU): 256x256, f=16, K=1024, D=256, lr 4.5e-6 x batch 8, and the
# official code's quantizer: taming's learnable codebook, commitment 1.0 and codebook 0.25
_PAPER: dict = {
    "image_size": 256, "backbone": "vqgan", "base_channels": 128,
    "channel_multipliers": (1, 1, 2, 2, 4), "res_blocks": 2, "code_dim": 256,
    "codebook_size": 1024, "quantizer": "learnable", **TAMING_LEGACY_WEIGHTS, "batch_size": 8,
    "learning_rate": 4.5e-6 * 8, "train_images": 0, "checkpoint_every": 2000,
    "sample_every": 2000, "word_vocabulary": "full",
    # the paper's masking (context from the unmasked caption) leaks the masked word through a
    # bidirectional encoder such as the default MiniLM far more than through CLIP's causal one
    "mask_before_encoding": True,
}

PRESETS: dict[str, dict] = {
    # The main job's preset (make demo), sized for 2 CPU cores: 32x32 captioned shapes with
    # objects drawn larger than the data set's default (radii 0.15 / 0.10 of the side), 8x8
    # tokens. Choices measured on them (docs/method.md, "The demo's settings"):
    # - the classic VQ-VAE's MSE pixel loss, not L1: under L1 the median pixel around a small
    #   object is background, and after 1,000 steps objects were still grey blobs (colour
    #   fidelity 0.20 by a cruder majority-vote judge, chance 0.125); with MSE and the larger objects the plain tokenizer reached
    #   0.97 in 1,200 steps of batch 16 (cosine schedule from 2e-3);
    # - the paper's language weights: 100x them (the old demo's choice) cost LG-VQ 4.7 dB of
    #   PSNR and its colours (fidelity 0.64 vs 0.95, seed 0); the paper's kept it level (27.9 vs
    #   27.2 dB);
    # - words masked before encoding, the decoder reading the masked captions' input embeddings
    #   (no text-encoder forward per step, nothing of the masked word leaks), training masking
    #   attribute words only and the word head scoring the training captions' 62 token ids;
    # - a masked text decoder 128 wide with 4 heads instead of the text width (384) with 1: the
    #   heads' step 3x cheaper; heads trained alone on the frozen baseline tokenizer of seed 0
    #   (`make demo` at commit 44b8a9e, the preset before the captions-per-image change)
    #   (`lgvq probe`, 1,200 steps, one caption per image) read as much with either (Recall@1
    #   gap over the shuffled-image control 0.053 against 0.059 for the official decoder);
    # - five captions per image per step for the masked-word head, with one decoder layer and
    #   no decoder dropout: on the same frozen codes the gap rose from 0.053 (1 caption, the
    #   official 2 layers with dropout 0.1) to 0.065 without dropout, 0.145 with 3 captions and
    #   1 layer, 0.205 with 5 captions and 1 layer (0.209 with 2 layers, whose step costs 30 ms
    #   more at batch 16); one caption per image left the heads barely reading the image.
    "shapes": {"pixel_loss": "mse", "object_radii": (0.15, 0.10),
               "decoder_width": 128, "decoder_heads": 4, "decoder_layers": 1,
               "decoder_dropout": 0.0, "captions_per_image": 5,
               "mask_before_encoding": True, "masked_text_features": "embeddings",
               "mask_words": "attributes", "train_images": 1024, "batch_size": 16,
               "steps": 1200, "learning_rate": 2e-3, "learning_rate_schedule": "cosine",
               "warmup_steps": 50, "codebook_size": 256, "dead_code_threshold": 1.0,
               "log_every": 50, "checkpoint_every": 400, "sample_every": 400},
    "shapes-tiny": {"alpha": 0.1, "beta": 1.0, "gamma": 0.01, "pixel_loss": "mse",
                    "mask_before_encoding": True, "masked_text_features": "embeddings",
                    "mask_words": "attributes", "train_images": 256,
                    "eval_images": 64, "steps": 30, "batch_size": 8,
                    "base_channels": 16, "code_dim": 16, "codebook_size": 32,
                    "checkpoint_every": 10, "log_every": 5, "sample_every": 30},
    "cub": {**_PAPER, "dataset": "cub", "alpha": 1e-3, "beta": 1e-3, "gamma": 1e-3,
            "steps": 200_000, "out_dir": "runs/cub"},
    "celeba": {**_PAPER, "dataset": "celeba", "alpha": 1e-3, "beta": 1e-2, "gamma": 1e-4,
               "steps": 200_000, "out_dir": "runs/celeba"},
    "coco": {**_PAPER, "dataset": "coco", "alpha": 1e-3, "beta": 1e-2, "gamma": 1e-4,
             "steps": 400_000, "out_dir": "runs/coco"},
}


def _coerce(field_: dataclasses.Field, value):
    """Turn a command-line string (or JSON value) into the field's type."""
    kind = field_.type if isinstance(field_.type, str) else getattr(field_.type, "__name__", "")
    if not isinstance(value, str):
        return tuple(value) if "tuple" in str(kind) and isinstance(value, list) else value
    text = value.strip()
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{field_.name} expects true/false, got {value!r}")
    if "tuple" in kind:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        convert = float if "float" in kind else int
        try:
            return tuple(convert(p) for p in parts)
        except ValueError:
            raise ValueError(f"--{field_.name} expects comma-separated numbers, got {value!r}") \
                from None
    if kind == "int":
        try:
            return int(float(text)) if "e" in text.lower() else int(text)
        except ValueError:
            raise ValueError(f"--{field_.name} expects an integer, got {value!r}") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{field_.name} expects a number, got {value!r}") from None
    return text


def build_config(preset: str = "shapes", overrides: dict | None = None) -> TrainConfig:
    """The preset's config with ``overrides`` (``{"steps": "100"}`` strings or values) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset, **(overrides or {})}
    return TrainConfig.from_dict(values)


def parse_overrides(arguments: list[str]) -> dict[str, str]:
    """``["--steps=100", "--resume"]`` → ``{"steps": "100", "resume": "true"}``."""
    overrides: dict[str, str] = {}
    for argument in arguments:
        if not argument.startswith("--") or len(argument) == 2:
            raise ValueError(f"expected --key=value (or a bare --flag), got {argument!r}")
        key, eq, value = argument[2:].partition("=")
        overrides[key.replace("-", "_")] = value if eq else "true"
    return overrides

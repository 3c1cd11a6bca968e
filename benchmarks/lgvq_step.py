"""One LG-VQ training step against the same backbone's step without language losses.

Shape dict: {"model": "shapes" | "paper", "B": images per step}.
  shapes  the demo's tokenizer: 32x32 images, 8x8 tokens, K=256, D=32 (lgvq.config "shapes")
  paper   the paper's VQGAN: 256x256 images, f=16 (16x16 tokens), 128 base channels, K=1024,
          D=256 (lgvq.config "cub" without the discriminator, which starts at step 10,000)
Inputs: captioned-shapes images resized to the model's size and the preset's captions per image
(``captions_per_image``), encoded once by the frozen MiniLM outside the timing (training reads
cached features the same way).

Providers (each times forward + backward + Adam step of everything it trains):
  vq             the backbone alone: encoder, quantizer, decoder; its pixel loss + VQ loss
  lgvq           + the three language losses (visual-token encoder, InfoNCE, masked decoder and
                 tied MLM head, fused relation loss) on cached text features, with the
                 preset's masked-word context (demo: the masked captions' input embeddings,
                 a head over the data set's vocabulary)
  lgvq-encoder   as lgvq, but the masked captions are re-encoded by the frozen text encoder
                 every step (masked_text_features=encoder): what that context costs
  probes         the demo's baseline: the backbone plus the same heads on detached tokens
"""

from __future__ import annotations

import functools

import torch

from benchmarks import harness

MODELS = {
    "shapes": ("shapes", {}),
    "paper": ("cub", {"dataset": "shapes", "train_images": 64}),
}

SHAPE_SETS = {
    "quick": [{"model": "shapes", "B": 16}],
    "full": [{"model": "shapes", "B": 16}, {"model": "paper", "B": 2}],
    "gpu": [{"model": "paper", "B": 8}],
    "bench": [{"model": "shapes", "B": 16}],
}


SHAPE_FORMAT = harness.ShapeFormat("{model}:{B}", label="{model} B{B}",
                                   words={"model": tuple(MODELS)})


def input_bytes(shape: dict, dtype: str) -> int:
    from lgvq.config import build_config

    preset, overrides = MODELS[shape["model"]]
    size = build_config(preset, overrides).image_size
    return shape["B"] * 3 * size * size * 4


@functools.lru_cache(maxsize=1)
def _text_encoder():
    from lgvq.text import load_text_encoder

    return load_text_encoder("minilm", max_length=30)


def _setup(shape: dict, device: torch.device, guidance: bool, heads: bool, **changes):
    from lgvq.config import build_config
    from lgvq.data import build_dataset, draw_captions_per_image
    from lgvq.training import adam, build_backbone, build_model, mask_words, masked_context

    preset, overrides = MODELS[shape["model"]]
    config = build_config(preset, {**overrides, "batch_size": shape["B"], "backbone": "vqvae",
                                   "language_guidance": guidance, **changes})
    text_encoder = _text_encoder().to(device)
    torch.manual_seed(0)
    backbone = build_backbone(config)
    model = build_model(config, text_encoder, tokenizer=backbone.model).to(device)
    objective = backbone.loss.to(device)
    data = build_dataset("shapes", split="train", image_size=config.image_size,
                         size=shape["B"])
    images = torch.stack([data[i]["image"] for i in range(shape["B"])]).to(device)
    captions = draw_captions_per_image([data[i]["captions"] for i in range(shape["B"])],
                                       config.captions_per_image, torch.Generator().manual_seed(0))
    text = text_encoder.encode(captions).to(device)
    masked_ids, masked = mask_words(text_encoder, text, config, 0)
    masked = masked.to(device)
    trained = model.parameters() if heads else model.tokenizer.parameters()
    optimizer = adam(trained, lr=1e-5, betas=(0.5, 0.9))  # training's Adam (foreach)
    model.train()

    def step():
        _, zq_st, _, vq_loss, _ = model.tokenizer.encode(images)
        reconstruction = model.tokenizer.decode(zq_st).float()
        loss, _ = objective.generator_loss(images, reconstruction, vq_loss, 0)
        if heads:
            context = masked_context(config, text_encoder, masked_ids.to(device), text)
            loss = loss + model.language_losses(zq_st, text, masked, context).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


# the LG-VQ step against the plain step: at the paper's scale the backbone dominates (<= 1.05x);
# at the demo's toy scale the heads are as large as the tokenizer (<= 1.5x)
STEP_RATIO_TARGETS = {"shapes": 1.5, "paper": 1.05}


def _targets(rows):
    targets = []
    for (shape, _), found in sorted(harness.rows_by_case(rows).items()):
        bound = STEP_RATIO_TARGETS[shape.split()[0]]
        targets.append(harness.ratio_target(
            f"LG-VQ step <= {bound}x the step without language losses ({shape}): lgvq / vq",
            found, "lgvq", "vq", at_most=bound))
    return targets


FAMILY = harness.register(harness.OpFamily(
    name="lgvq_step", module=__name__, shape_sets=SHAPE_SETS, input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT, baseline="vq", targets=_targets))


def _text_available(device: torch.device) -> tuple[bool, str]:
    try:
        from lgvq.text.huggingface import minilm_model_directory

        minilm_model_directory()
    except Exception as error:  # noqa: BLE001 - any reason the weights are missing
        return False, f"the MiniLM weights are not installed ({error})"
    return True, ""


@FAMILY.provider("vq", "backbone only (no language losses)", available=_text_available)
def vq_step(shape: dict, device: torch.device, dtype: str):
    return _setup(shape, device, guidance=False, heads=False)


@FAMILY.provider("lgvq", "LG-VQ (cached text features)", available=_text_available)
def lgvq_step(shape: dict, device: torch.device, dtype: str):
    return _setup(shape, device, guidance=True, heads=True)


@FAMILY.provider("lgvq-encoder", "LG-VQ, masked captions re-encoded every step",
                 available=_text_available)
def lgvq_encoder_step(shape: dict, device: torch.device, dtype: str):
    return _setup(shape, device, guidance=True, heads=True, mask_before_encoding=True,
                  masked_text_features="encoder")


@FAMILY.provider("probes", "backbone + probe heads (demo baseline)", available=_text_available)
def probes_step(shape: dict, device: torch.device, dtype: str):
    return _setup(shape, device, guidance=False, heads=True)

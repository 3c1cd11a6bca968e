"""Image-tokenizer models LG-VQ wraps: VQGAN encoder/decoder, VQ model, PatchGAN, LPIPS."""

from lgvq.models.backbones import BackboneConfig, Decoder, Encoder
from lgvq.models.discriminator import (
    PatchDiscriminator,
    VQGANLoss,
    adaptive_generator_weight,
    discriminator_factor,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from lgvq.models.lpips import LPIPS
from lgvq.models.vqmodel import (
    TAMING_QUANTIZER_KWARGS,
    BuiltVQModel,
    VQEncoding,
    VQModel,
    VQModelConfig,
    build_default_quantizer,
    build_vqgan,
    build_vqvae,
)

__all__ = [
    "BackboneConfig",
    "Encoder",
    "Decoder",
    "PatchDiscriminator",
    "VQGANLoss",
    "adaptive_generator_weight",
    "discriminator_factor",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "LPIPS",
    "TAMING_QUANTIZER_KWARGS",
    "BuiltVQModel",
    "VQEncoding",
    "VQModel",
    "VQModelConfig",
    "build_default_quantizer",
    "build_vqgan",
    "build_vqvae",
]

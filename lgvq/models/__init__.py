"""Image-tokenizer models LG-VQ wraps (VQGAN encoder/decoder, VQ model, PatchGAN, LPIPS) and
``LGVQ``, the language-guidance heads around one."""

from lgvq.models.backbones import BackboneConfig, Decoder, Encoder
from lgvq.models.discriminator import (
    PatchDiscriminator,
    VQGANLoss,
    adaptive_generator_weight,
    discriminator_factor,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from lgvq.models.language_guided import LGVQ, LanguageLosses, LanguageLossWeights
from lgvq.models.lpips import LPIPS
from lgvq.models.vqmodel import (
    BuiltVQModel,
    VQEncoding,
    VQModel,
    VQModelConfig,
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
    "LGVQ",
    "LanguageLosses",
    "LanguageLossWeights",
    "LPIPS",
    "BuiltVQModel",
    "VQEncoding",
    "VQModel",
    "VQModelConfig",
    "build_vqgan",
    "build_vqvae",
]

"""Encoder/decoder: shapes over configs and resolutions, the paper layout, gradients, errors."""

import pytest
import torch

from lgvq.models import BackboneConfig, Decoder, Encoder
from lgvq.models.backbones import AttentionBlock, Downsample, ResidualBlock


def _round_trip_shapes(config: BackboneConfig, batch: int, height: int, width: int):
    torch.manual_seed(0)
    encoder, decoder = Encoder(config), Decoder(config)
    images = torch.rand(batch, config.in_channels, height, width) * 2 - 1
    latents = encoder(images)
    reconstructions = decoder(latents)
    return latents, reconstructions


@pytest.mark.parametrize(
    "overrides, size, expected_grid",
    [
        (dict(), (32, 32), (8, 8)),  # micro: f=4
        (dict(), (32, 48), (8, 12)),  # non-square input
        (dict(channel_multipliers=(1, 2, 2, 2)), (32, 32), (4, 4)),  # f=8
        (dict(channel_multipliers=(2,)), (16, 16), (16, 16)),  # f=1, one level
        (dict(downsample_with_conv=False, middle_attention=False), (32, 32), (8, 8)),
        (dict(num_res_blocks=2, attention_resolutions=(32, 8)), (32, 32), (8, 8)),
        (dict(in_channels=1, out_channels=1, dropout=0.1), (24, 24), (6, 6)),
    ],
)
def test_round_trip_shapes(micro_backbone, overrides, size, expected_grid):
    config = micro_backbone.replace(**overrides)
    latents, reconstructions = _round_trip_shapes(config, 2, *size)
    assert latents.shape == (2, config.z_channels, *expected_grid)
    assert reconstructions.shape == (2, config.out_channels, *size)
    assert torch.isfinite(reconstructions).all()


def test_tiny_config_maps_64_to_16x16_tokens():
    config = BackboneConfig.tiny()
    assert config.downsampling_factor == 4 and config.token_grid_size == 16
    with torch.no_grad():
        latents, reconstructions = _round_trip_shapes(config, 2, 64, 64)
    assert latents.shape == (2, config.z_channels, 16, 16)
    assert reconstructions.shape == (2, 3, 64, 64)


def test_paper_config_matches_the_vqgan_f16_layout():
    config = BackboneConfig.paper()
    assert config.downsampling_factor == 16 and config.token_grid_size == 16
    with torch.device("meta"):  # structure only: no 72 M-parameter initialisation
        encoder, decoder = Encoder(config), Decoder(config)
    # taming's f=16 VQGAN: attention after both res blocks of the 16x16 level (encoder), after
    # all three of the decoder's 16x16 level, plus one in each middle block
    count = lambda module, kind: sum(isinstance(m, kind) for m in module.modules())  # noqa: E731
    assert count(encoder, AttentionBlock) == 2 + 1 and count(decoder, AttentionBlock) == 3 + 1
    assert count(encoder, Downsample) == 4
    assert count(encoder, ResidualBlock) == 5 * 2 + 2
    assert count(decoder, ResidualBlock) == 5 * 3 + 2
    assert encoder.input_conv.in_channels == 3 and encoder.input_conv.out_channels == 128
    assert encoder.output_conv.in_channels == 512 and encoder.output_conv.out_channels == 256
    assert decoder.input_conv.out_channels == 512 and decoder.output_conv.in_channels == 128
    parameters = sum(p.numel() for p in encoder.parameters()) + sum(
        p.numel() for p in decoder.parameters())
    assert 70e6 < parameters < 73e6  # 29.3 M + 42.4 M, as taming's f16 VQGAN


def test_paper_layout_runs_at_reduced_width():
    # the paper layout with base width 16 instead of 128, at 32x32 (2x2 tokens), to stay fast
    config = BackboneConfig.paper(base_channels=16, norm_groups=8)
    with torch.no_grad():
        latents, reconstructions = _round_trip_shapes(config, 1, 32, 32)
    assert latents.shape == (1, 256, 2, 2) and reconstructions.shape == (1, 3, 32, 32)


def test_gradients_reach_every_parameter(micro_backbone):
    torch.manual_seed(0)
    encoder, decoder = Encoder(micro_backbone), Decoder(micro_backbone)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    (decoder(encoder(images)) - images).square().mean().backward()
    for module in (encoder, decoder):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


def test_decoder_exposes_last_layer(micro_backbone):
    decoder = Decoder(micro_backbone)
    assert decoder.last_layer is decoder.output_conv.weight


def test_bad_inputs_raise_readable_errors(micro_backbone):
    encoder, decoder = Encoder(micro_backbone), Decoder(micro_backbone)
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, H, W\]"):
        encoder(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        encoder(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TypeError, match="floating-point"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"latents must have shape \[B, 16, H, W\]"):
        decoder(torch.zeros(1, 8, 8, 8))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(channel_multipliers=()), "at least one level"),
        (dict(image_size=30), "divisible by the downsampling factor"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(base_channels=0), "base_channels"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig.tiny(**overrides)

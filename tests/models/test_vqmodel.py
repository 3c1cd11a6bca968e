"""VQModel: encode/decode shapes, straight-through gradients, decode_indices round trip,
interface compatibility with lucidrains' VectorQuantize, builders and config."""

import pytest
import torch
from torch import nn

from lgvq.models import (
    Decoder,
    Encoder,
    VQEncoding,
    VQGANLoss,
    VQModel,
    VQModelConfig,
    build_vqgan,
    build_vqvae,
)

EMBED_DIM = 12


@pytest.fixture
def model(micro_backbone, make_quantizer) -> VQModel:
    torch.manual_seed(0)
    return VQModel(Encoder(micro_backbone), Decoder(micro_backbone),
                   make_quantizer(EMBED_DIM, codebook_size=32), EMBED_DIM)


def _images(batch=2, size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def test_encode_returns_pre_and_straight_through_maps(model):
    encoding = model.encode(_images())
    assert isinstance(encoding, VQEncoding)
    z_e, zq_st, indices, vq_loss, info = encoding
    assert z_e.shape == zq_st.shape == (2, EMBED_DIM, 8, 8)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.int64
    assert vq_loss.dim() == 0 and vq_loss > 0
    assert info == {"quantizer_extras": ()}
    # the straight-through map holds exactly the chosen codes
    codes = model.quantizer.codebook[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(zq_st, codes)


def test_forward_returns_reconstruction_loss_and_info(model):
    reconstructions, vq_loss, info = model(_images(size=32))
    assert reconstructions.shape == (2, 3, 32, 32)
    assert vq_loss.dim() == 0
    assert set(info) == {"z_e", "zq_st", "indices", "quantizer_extras"}
    assert info["zq_st"].shape == (2, EMBED_DIM, 8, 8)


def test_non_square_images(model):
    reconstructions, _, info = model(_images(size=32)[..., :24])
    assert reconstructions.shape == (2, 3, 32, 24) and info["indices"].shape == (2, 8, 6)


def test_straight_through_gradient_reaches_the_encoder(model):
    # reconstruction loss only: the codebook gets no gradient, the encoder does
    reconstructions, _, _ = model(_images())
    reconstructions.square().mean().backward()
    assert model.quantizer.codebook.grad is None
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model.pre_quantization_conv.weight.grad.abs().sum() > 0


def test_language_losses_can_read_zq_st(model):
    # a loss on zq_st alone (as LG-VQ's heads use it) reaches the encoder, not the codebook
    _, _, info = model(_images())
    info["zq_st"].sum().backward()
    assert model.encoder.input_conv.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.grad is None


def test_decode_indices_round_trip(model):
    model.eval()
    with torch.no_grad():
        encoding = model.encode(_images())
        from_indices = model.decode_indices(encoding.indices)
        from_map = model.decode(encoding.zq_st)
        assert torch.equal(model.encode_to_indices(_images()), encoding.indices)
    torch.testing.assert_close(from_indices, from_map)
    assert from_indices.shape == (2, 3, 32, 32)


def test_last_layer_is_the_decoder_output_weight(model):
    assert model.last_layer is model.decoder.output_conv.weight
    assert model.downsampling_factor == 4


def test_works_with_lucidrains_vector_quantize(micro_backbone):
    vector_quantize_pytorch = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    quantizer = vector_quantize_pytorch.VectorQuantize(dim=EMBED_DIM, codebook_size=16)
    model = VQModel(Encoder(micro_backbone), Decoder(micro_backbone), quantizer, EMBED_DIM)
    model.eval()
    with torch.no_grad():
        reconstructions, vq_loss, info = model(_images())
        assert reconstructions.shape == (2, 3, 32, 32) and vq_loss.dim() == 0
        assert info["indices"].shape == (2, 8, 8)
        torch.testing.assert_close(model.decode_indices(info["indices"]),
                                   model.decode(info["zq_st"]), atol=1e-5, rtol=1e-5)


class _BadQuantizer(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output(x)

    def get_output_from_indices(self, indices):
        raise NotImplementedError


@pytest.mark.parametrize(
    "output, error, message",
    [
        (lambda x: x, TypeError, "must return \\(quantized, indices, loss"),
        (lambda x: (x[:, :-1], x[..., 0].long(), x.sum()), ValueError, "quantized of shape"),
        (lambda x: (x, x[:, :-1, 0].long(), x.sum()), ValueError, "indices of shape"),
    ],
)
def test_bad_quantizer_outputs_are_reported(micro_backbone, output, error, message):
    model = VQModel(Encoder(micro_backbone), Decoder(micro_backbone), _BadQuantizer(output),
                    micro_backbone.z_channels)
    with pytest.raises(error, match=message):
        model.encode(_images())


def test_constructor_and_decode_checks(micro_backbone, make_quantizer, model):
    with pytest.raises(TypeError, match="get_output_from_indices"):
        VQModel(Encoder(micro_backbone), Decoder(micro_backbone), nn.Identity(), 8)
    with pytest.raises(ValueError, match="same z_channels"):
        VQModel(Encoder(micro_backbone), Decoder(micro_backbone.replace(z_channels=8)),
                make_quantizer(8), 8)
    with pytest.raises(ValueError, match=r"zq must have shape \[B, 12, h, w\]"):
        model.decode(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match=r"indices must be an integer tensor"):
        model.decode_indices(torch.zeros(1, 8, 8))


def test_builders(micro_backbone, make_quantizer):
    config = VQModelConfig(backbone=micro_backbone, embed_dim=EMBED_DIM, codebook_size=32,
                           disc_start=5, disc_channels=8)
    vqvae = build_vqvae(config, quantizer=make_quantizer(EMBED_DIM))
    assert isinstance(vqvae.model, VQModel) and isinstance(vqvae.loss, VQGANLoss)
    assert vqvae.loss.discriminator is None and not vqvae.loss.perceptual_enabled
    assert not vqvae.loss.discriminator_active(10**6)

    with pytest.warns(UserWarning, match="LPIPS weights not found"):
        vqgan = build_vqgan(config.to_dict() | {"lpips_weights_path": "/nonexistent/lpips.pth"},
                            quantizer=make_quantizer(EMBED_DIM))
    assert vqgan.loss.discriminator is not None and not vqgan.loss.perceptual_enabled
    assert vqgan.loss.disc_start == 5 and vqgan.loss.disc_weight == 0.8

    # one training step of each side, sharing one forward
    images = _images()
    reconstructions, vq_loss, _ = vqgan.model(images)
    loss, logs = vqgan.loss.generator_loss(images, reconstructions, vq_loss, 5,
                                           vqgan.model.last_layer)
    loss.backward()
    assert logs["adaptive_weight"] > 0
    d_loss, d_logs = vqgan.loss.discriminator_loss(images, reconstructions, 5)
    d_loss.backward()
    assert all(p.grad is not None for p in vqgan.loss.discriminator.parameters())


def test_config_round_trip_and_presets():
    config = VQModelConfig.tiny(codebook_size=512)
    assert VQModelConfig.from_dict(config.to_dict()) == config
    assert config.backbone.token_grid_size == 16
    paper = VQModelConfig.paper()
    assert (paper.embed_dim, paper.codebook_size, paper.backbone.downsampling_factor) == (
        256, 1024, 16)
    assert (paper.disc_start, paper.disc_weight) == (10_000, 0.8)
    with pytest.raises(ValueError, match="unknown VQModelConfig field"):
        VQModelConfig.from_dict({"embed_dims": 3})
    with pytest.raises(TypeError, match="config must be a VQModelConfig"):
        build_vqvae(3)


def test_default_quantizer_is_lgvq_vector_quantizer(micro_backbone):
    try:
        from lgvq import VectorQuantizer
    except ImportError:
        pytest.skip("lgvq.VectorQuantizer is not available")
    torch.manual_seed(0)
    config = VQModelConfig.tiny(backbone=micro_backbone, embed_dim=EMBED_DIM, codebook_size=32)
    model, criterion = build_vqvae(config)
    assert isinstance(model.quantizer, VectorQuantizer)
    images = _images()
    reconstructions, vq_loss, info = model(images)
    loss, _ = criterion.generator_loss(images, reconstructions, vq_loss, 0)
    loss.backward()
    # taming's learnable codebook: trained by the codebook term, the encoder by the rest
    assert all(p.grad is not None for p in model.quantizer.parameters())
    assert model.encoder.input_conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        encoding = model.encode(images)
        torch.testing.assert_close(model.decode_indices(encoding.indices),
                                   model.decode(encoding.zq_st), atol=1e-4, rtol=1e-4)

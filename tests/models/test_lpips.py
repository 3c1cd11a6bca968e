"""LPIPS: the disabled (no weights) path and loading local weights in several layouts."""

import warnings

import pytest
import torch

from lgvq.models import LPIPS, VQGANLoss
from lgvq.models import lpips as lpips_module

# torchvision vgg16().features, written out independently of the module: index -> (out, in)
TORCHVISION_VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
    14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
    26: (512, 512), 28: (512, 512),
}
LPIPS_LINEAR_CHANNELS = (64, 128, 256, 512, 512)


def _vgg_features_state(prefix: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out_channels, in_channels) in TORCHVISION_VGG16_CONVS.items():
        fan_in = in_channels * 9
        state[f"{prefix}{index}.weight"] = torch.randn(
            out_channels, in_channels, 3, 3, generator=generator) * (2.0 / fan_in) ** 0.5
        state[f"{prefix}{index}.bias"] = torch.zeros(out_channels)
    return state


def _taming_slice(index: int) -> int:
    return 1 + sum(index > boundary for boundary in (3, 8, 15, 22))


def _linear_state(template: str, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {template.format(k): torch.rand(1, channels, 1, 1, generator=generator) / channels
            for k, channels in enumerate(LPIPS_LINEAR_CHANNELS)}


def _images(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1


def _check_distances(lpips: LPIPS):
    assert lpips.enabled
    a, b = _images(0), _images(1)
    same = lpips(a, a)
    assert same.shape == (2,) and torch.equal(same, torch.zeros(2))
    different = lpips(a, b.requires_grad_())
    assert torch.isfinite(different).all() and (different > 0).all()
    different.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())


def test_missing_weights_warn_once_and_disable(tmp_path):
    missing = tmp_path / "lpips_vgg.pth"
    with pytest.warns(UserWarning, match=f"LPIPS weights not found at {missing}; the "
                                         "perceptual term is disabled"):
        lpips = LPIPS(missing)
    assert not lpips.enabled and list(lpips.parameters()) == []
    assert torch.equal(lpips(_images(0), _images(1)), torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LPIPS(missing)  # same path: no second warning


def test_no_path_warns(monkeypatch):
    monkeypatch.setattr(lpips_module, "_WARNED_MISSING", set())
    with pytest.warns(UserWarning, match="LPIPS weights not found at None"):
        assert not LPIPS(None).enabled


def test_disabled_lpips_leaves_vqgan_loss_at_l1(tmp_path):
    with pytest.warns(UserWarning):
        criterion = VQGANLoss(None, LPIPS(tmp_path / "absent.safetensors"))
    images, reconstructions = _images(0), _images(1)
    loss, logs = criterion.generator_loss(images, reconstructions, torch.tensor(0.0), 0)
    assert not criterion.perceptual_enabled and logs["perceptual_loss"] == 0
    torch.testing.assert_close(loss, (images - reconstructions).abs().mean())


def test_loads_torchvision_features_and_lpips_linear_layers(tmp_path):
    state = _vgg_features_state("features.") | _linear_state("lin{}.model.1.weight")
    state["classifier.0.weight"] = torch.zeros(3, 3)  # ignored
    path = tmp_path / "vgg_lpips.pth"
    torch.save(state, path)
    lpips = LPIPS(path)
    loaded = dict(lpips.named_parameters())
    for index in TORCHVISION_VGG16_CONVS:
        assert torch.equal(loaded[f"features.{index}.weight"], state[f"features.{index}.weight"])
    for k in range(5):
        assert torch.equal(loaded[f"channel_weights.{k}.weight"], state[f"lin{k}.model.1.weight"])
    assert len(loaded) == 2 * len(TORCHVISION_VGG16_CONVS) + 5
    _check_distances(lpips)


def test_loads_taming_layout_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    features = _vgg_features_state("")
    state = {f"perceptual_loss.net.slice{_taming_slice(int(key.split('.')[0]))}.{key}": value
             for key, value in features.items()}
    state |= _linear_state("perceptual_loss.lin{}.model.1.weight")
    state["perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    path = tmp_path / "taming_lpips.safetensors"
    save_file(state, str(path))
    lpips = LPIPS(path)
    assert torch.equal(lpips.features[28].weight, features["28.weight"])
    _check_distances(lpips)


def test_separate_backbone_and_linear_files(tmp_path):
    torch.save(_vgg_features_state(""), tmp_path / "vgg16_features.pth")  # features alone
    torch.save({"state_dict": _linear_state("lins.{}.model.0.weight")}, tmp_path / "lin.ckpt")
    lpips = LPIPS(tmp_path / "lin.ckpt", backbone_weights_path=tmp_path / "vgg16_features.pth")
    _check_distances(lpips)
    # the linear layers alone are not enough
    with pytest.raises(ValueError, match="missing 26 tensor.*pass backbone_weights_path"):
        LPIPS(tmp_path / "lin.ckpt")


def test_wrong_shapes_are_reported(tmp_path):
    state = _vgg_features_state("features.") | _linear_state("lin{}.model.1.weight")
    state["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"channel_weights.2.weight: expected \(1, 256, 1, 1\)"):
        LPIPS(tmp_path / "bad.pth")


def test_frozen_network_stays_out_of_checkpoints(tmp_path):
    state = _vgg_features_state("features.") | _linear_state("lin{}.model.1.weight")
    torch.save(state, tmp_path / "lpips.pth")
    criterion = VQGANLoss(torch.nn.Conv2d(3, 1, 1), LPIPS(tmp_path / "lpips.pth"))
    saved = criterion.state_dict()
    assert set(saved) == {"discriminator.weight", "discriminator.bias"}
    # a checkpoint without LPIPS keys, or with foreign ones, loads strictly
    criterion.load_state_dict(saved)
    criterion.load_state_dict(saved | {"perceptual.features.0.weight": torch.zeros(1)})
    assert torch.equal(criterion.perceptual.features[0].weight, state["features.0.weight"])
    # and so does a disabled LPIPS
    with pytest.warns(UserWarning):
        disabled = VQGANLoss(torch.nn.Conv2d(3, 1, 1), LPIPS(tmp_path / "none.pth"))
    disabled.load_state_dict(saved | {"perceptual.features.0.weight": torch.zeros(1)})
    criterion.train()
    assert not criterion.perceptual.training

"""LPIPS perceptual distance (Zhang et al. 2018), from local weights only.

Nothing is ever downloaded. :class:`LPIPS` takes the path of a local weights file; when the
path is ``None`` or does not exist it warns once ("LPIPS weights not found at ...; the
perceptual term is disabled") and returns zero distances, so a VQGAN loss built on it runs with
L1 + GAN only.

The VGG16 feature stack is written out here (torchvision is not a dependency) with the same
module indices as ``torchvision.models.vgg16().features``, so its parameters are named
``features.<index>.weight`` / ``.bias`` with index in {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24,
26, 28}. The five LPIPS channel-weighting layers are ``channel_weights.<k>.weight`` with shape
``[1, C_k, 1, 1]``, C = (64, 128, 256, 512, 512).

Accepted weight files (``.pth``/``.pt``/``.ckpt`` via ``torch.load(weights_only=True)``, or
``.safetensors``), keys matched anywhere after a prefix such as ``module.`` or
``loss.perceptual_loss.``:

- the full LPIPS/taming state dict (``net.slice<k>.<index>.weight``,
  ``lin<k>.model.<j>.weight``);
- a torchvision ``vgg16()`` state dict (``features.<index>.weight``) or its ``features`` alone
  (``<index>.weight``), combined with the LPIPS linear layers (``lin<k>.model.<j>.weight``,
  ``lins.<k>.model.<j>.weight``), in one file or as two files (``backbone_weights_path``
  for the VGG16 features, ``weights_path`` for the linear layers);
- this module's own names.

The frozen network is kept out of ``state_dict()`` (it is ~59 MB and reloaded from its file),
and LPIPS keys found in a checkpoint are ignored on load.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["LPIPS", "VGG16_FEATURE_LAYERS", "LPIPS_TAP_INDICES", "LPIPS_CHANNELS",
           "load_lpips_state_dict"]

# torchvision vgg16 ``features``: ("conv", in, out) or ("pool",); ReLU follows every conv and
# takes its own index, as in torchvision. Only indices 0..29 are needed (last tap is relu5_3).
VGG16_FEATURE_LAYERS: tuple[tuple, ...] = (
    ("conv", 3, 64), ("conv", 64, 64), ("pool",),
    ("conv", 64, 128), ("conv", 128, 128), ("pool",),
    ("conv", 128, 256), ("conv", 256, 256), ("conv", 256, 256), ("pool",),
    ("conv", 256, 512), ("conv", 512, 512), ("conv", 512, 512), ("pool",),
    ("conv", 512, 512), ("conv", 512, 512), ("conv", 512, 512),
)
# indices (in the torchvision numbering) of the ReLUs whose outputs LPIPS compares:
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# LPIPS input scaling for images in [-1, 1] (the values of the reference implementation)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_WARNED_MISSING: set[str] = set()  # paths already warned about, so each is reported once


def _build_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in VGG16_FEATURE_LAYERS:
        if spec[0] == "conv":
            layers += [nn.Conv2d(spec[1], spec[2], 3, padding=1), nn.ReLU(inplace=False)]
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)  # indices 0..29, as torchvision's features[:30]


_FEATURE_KEY = re.compile(r"(?:^|\.)(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_BARE_FEATURE_KEY = re.compile(r"^(\d+)\.(weight|bias)$")
_LINEAR_KEY = re.compile(r"(?:^|\.)(?:lin|lins\.)(\d)\.model\.\d\.weight$")
_OWN_LINEAR_KEY = re.compile(r"(?:^|\.)channel_weights\.(\d)\.weight$")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
        state["state_dict"], Mapping
    ):
        state = state["state_dict"]  # Lightning / taming checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(
            f"LPIPS weights file {path} must hold a state dict (a mapping of names to tensors), "
            f"got {type(state).__name__}"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_lpips_state_dict(*paths: str | Path) -> dict[str, torch.Tensor]:
    """Read one or more weights files and rename their tensors to :class:`LPIPS`'s names.

    Returns a dict with keys ``features.<index>.weight|bias`` and ``channel_weights.<k>.weight``
    (only those found; other keys, e.g. torchvision's classifier, are dropped).
    """
    renamed: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, tensor in _read_weights_file(Path(path)).items():
            if match := _FEATURE_KEY.search(key) or _BARE_FEATURE_KEY.match(key):
                renamed[f"features.{match.group(1)}.{match.group(2)}"] = tensor
            elif match := _LINEAR_KEY.search(key) or _OWN_LINEAR_KEY.search(key):
                renamed[f"channel_weights.{match.group(1)}.weight"] = tensor
    return renamed


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16) distance between images in [-1, 1]; disabled without local weights.

    Args:
        weights_path: local file with the VGG16 features and the LPIPS linear layers (or only
            the linear layers, when ``backbone_weights_path`` holds the VGG16 features).
            ``None`` or a missing file disables the module (warning once per path).
        backbone_weights_path: optional second local file, e.g. a torchvision ``vgg16``
            state dict, read before ``weights_path``. A missing file also disables the module.

    Raises:
        ValueError: a file exists but lacks tensors, or holds tensors of the wrong shape.
    """

    def __init__(self, weights_path: str | Path | None,
                 backbone_weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.backbone_weights_path = (
            None if backbone_weights_path is None else Path(backbone_weights_path)
        )
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

        missing = [
            path for path in (self.backbone_weights_path, self.weights_path)
            if path is not None and not path.is_file()
        ]
        if self.weights_path is None or missing:
            self.enabled = False
            shown = str(missing[0]) if missing else "None (no path given)"
            if shown not in _WARNED_MISSING:
                _WARNED_MISSING.add(shown)
                warnings.warn(
                    f"LPIPS weights not found at {shown}; the perceptual term is disabled",
                    UserWarning, stacklevel=2,
                )
        else:
            self.enabled = True
            with torch.device("meta"):  # shapes only; the file provides every value
                self.features = _build_vgg16_features()
                self.channel_weights = nn.ModuleList(
                    nn.Conv2d(channels, 1, 1, bias=False) for channels in LPIPS_CHANNELS
                )
            files = [p for p in (self.backbone_weights_path, self.weights_path) if p is not None]
            self._load_network_weights(load_lpips_state_dict(*files), files)
            self.requires_grad_(False)
            self.eval()

        # the frozen network is not part of checkpoints: drop it on save, ignore it on load
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_ignore_own_keys)

    def _load_network_weights(self, state: dict[str, torch.Tensor], files: list[Path]) -> None:
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(state))
        wrong_shape = [
            f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
            for k in expected if k in state and state[k].shape != expected[k].shape
        ]
        if missing or wrong_shape:
            raise ValueError(
                f"LPIPS weights in {', '.join(map(str, files))} do not fit VGG16 + LPIPS: "
                + (f"missing {len(missing)} tensor(s) {missing[:6]}" if missing else "")
                + ("; " if missing and wrong_shape else "")
                + (f"wrong shapes {wrong_shape[:6]}" if wrong_shape else "")
                + (" (the LPIPS linear-layer file needs the VGG16 features: pass "
                   "backbone_weights_path)" if missing and all(
                       k.startswith("features.") for k in missing) else "")
            )
        self.load_state_dict(
            {key: state[key].to(target.dtype).contiguous() for key, target in expected.items()},
            strict=True, assign=True,
        )

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (frozen)."""
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance.

        Args:
            input, target: float ``[B, 3, H, W]`` images in [-1, 1] (H, W >= 16).
        Returns:
            float ``[B]`` distances >= 0 (for non-negative linear weights), zeros when disabled.
            Gradients flow to both inputs, never to the frozen network.
        """
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(
                f"input and target must both have shape [B, 3, H, W], got "
                f"{tuple(input.shape)} and {tuple(target.shape)}"
            )
        if not self.enabled:
            return input.new_zeros(input.shape[0])
        batch = input.shape[0]
        both = torch.cat([input, target], dim=0)
        h = (both - self.shift.to(both.dtype)) / self.scale.to(both.dtype)
        distance = input.new_zeros(batch)
        tap = 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == LPIPS_TAP_INDICES[tap]:
                unit = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                difference = (unit[:batch] - unit[batch:]).square()
                distance = distance + self.channel_weights[tap](difference).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(LPIPS_TAP_INDICES):
                    break
        return distance


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _ignore_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                     missing_keys, unexpected_keys, error_msgs) -> None:
    # drop whatever the checkpoint holds for the frozen network and feed back the weights it
    # already has, so loading neither reports missing keys nor overwrites the local weights
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    # (parameters only: the scaling buffers are not persistent)
    for key, parameter in module.named_parameters():
        state_dict[prefix + key] = parameter.detach()

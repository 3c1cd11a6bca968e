"""Checkpoints in safetensors: model weights, optimizer states, RNG state and the config, in one
file written atomically (lgvq.files), so that a kill at any moment leaves the last good
checkpoint in place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lgvq.files import atomic_path

FORMAT_VERSION = "1"


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor]) -> dict:
    state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    marker = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(marker):
            index, key = name[len(marker):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], step: int, config: dict,
                    extra: dict | None = None,
                    modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write everything needed for an exact resume to ``path`` atomically. ``modules``: other
    trained modules (e.g. the discriminator), stored under ``module.<name>.``."""
    tensors = {f"model.{k}": v.detach().contiguous().clone()
               for k, v in model.state_dict().items()}
    for name, module in (modules or {}).items():
        tensors.update({f"module.{name}.{k}": v.detach().contiguous().clone()
                        for k, v in module.state_dict().items()})
    optimizer_meta = {name: _flatten_optimizer(f"optim.{name}", opt, tensors)
                      for name, opt in optimizers.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "format": FORMAT_VERSION,
        "step": str(step),
        "config": json.dumps(config, sort_keys=True),
        "optimizers": json.dumps(optimizer_meta),
        "extra": json.dumps(extra or {}),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return Path(path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint without loading its tensors: step, config, extra."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {error}") from None
    if metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an lgvq checkpoint (format {metadata.get('format')!r})")
    return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]),
            "extra": json.loads(metadata.get("extra", "{}"))}


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    restore_rng: bool = True,
                    modules: dict[str, torch.nn.Module] | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and optimizers and
    other ``modules``). Returns its metadata (step, config, extra)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta = read_checkpoint_metadata(path)
    with safe_open(str(path), framework="pt") as stream:
        optimizer_meta = json.loads(stream.metadata()["optimizers"])
    tensors = load_file(str(path))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    for name, module in (modules or {}).items():
        marker = f"module.{name}."
        module_state = {k[len(marker):]: v for k, v in tensors.items() if k.startswith(marker)}
        if not module_state and list(module.state_dict()):
            raise KeyError(f"checkpoint {path} has no module {name!r}")
        module.load_state_dict(module_state)
    for name, optimizer in (optimizers or {}).items():
        if name not in optimizer_meta:
            raise KeyError(f"checkpoint {path} has no optimizer {name!r}")
        optimizer.load_state_dict(_unflatten_optimizer(f"optim.{name}", optimizer_meta[name],
                                                       tensors))
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
    return meta

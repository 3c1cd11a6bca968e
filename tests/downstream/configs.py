"""Config builder and checks shared by the downstream task tests."""

import torch
from safetensors.torch import load_file

from lgvq.downstream.tasks import DownstreamConfig


def task_config(base: dict, tmp_path, task: str, **overrides) -> DownstreamConfig:
    """A 2-step config of ``task`` from a test file's ``base`` values, writing under tmp_path."""
    values = {**base, "task": task, "steps": 2, "out_dir": str(tmp_path / task),
              "cache_dir": str(tmp_path / "cache"), **overrides}
    return DownstreamConfig.from_dict(values)


def assert_same_weights(expected_path, actual_path) -> None:
    """Two task checkpoints hold the same tensors, bit for bit (the RNG state aside: a resumed
    process started from another one)."""
    expected, actual = load_file(str(expected_path)), load_file(str(actual_path))
    assert expected.keys() == actual.keys()
    for name in expected:
        if name != "rng.torch":
            assert torch.equal(expected[name], actual[name]), name

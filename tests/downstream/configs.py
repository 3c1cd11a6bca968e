"""Config builder shared by the downstream task tests."""

from lgvq.downstream.tasks import DownstreamConfig


def task_config(base: dict, tmp_path, task: str, **overrides) -> DownstreamConfig:
    """A 2-step config of ``task`` from a test file's ``base`` values, writing under tmp_path."""
    values = {**base, "task": task, "steps": 2, "out_dir": str(tmp_path / task),
              "cache_dir": str(tmp_path / "cache"), **overrides}
    return DownstreamConfig.from_dict(values)

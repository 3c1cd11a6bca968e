"""`lgvq` / `python -m lgvq`: the command line.

  lgvq train [--preset=shapes] [--key=value ...]     train LG-VQ (or --language_guidance=false)
  lgvq train --out_dir=runs/x --resume               continue runs/x with its own config
  lgvq eval CHECKPOINT [--out=report.md] [--images=N] evaluate a checkpoint into a report
  lgvq probe CHECKPOINT [--key=value ...]            train fresh language heads on a frozen
                                                     tokenizer's codes and score them (--help)
  lgvq presets                                       what each preset sets
  lgvq train --help / lgvq eval --help               every option: type, default, meaning
  lgvq downstream TASK --tokenizer=CKPT              generation on a tokenizer's codes (--help)
"""

from __future__ import annotations

import dataclasses
import csv
import inspect
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import lgvq.config
from lgvq.config import PRESETS, TrainConfig, build_config, parse_overrides
from lgvq.evaluation.evaluate import evaluate_checkpoint
from lgvq.training import RESUME_SAFE_KEYS, TrainingInterrupted, resume_config, train

USAGE = __doc__
DEFAULT_PRESET = "shapes"  # what a bare `lgvq train` runs

# lgvq eval's options (besides the checkpoint path): (type, default, description)
EVAL_OPTIONS = {
    "out": (str, "", "report file (default: report.md beside the checkpoint)"),
    "images": (int, 0, "held-out images to evaluate (0: the run's eval_images)"),
    "device": (str, "auto", "auto | cpu | cuda"),
}


class Option(NamedTuple):
    name: str
    kind: str  # how the value is written: INT, FLOAT, TEXT, true|false, INT,INT,...
    default: object
    description: str


def _kind(annotation: str) -> str:
    if "tuple" in annotation:
        return "FLOAT,FLOAT" if "float" in annotation else "INT,INT,..."
    return {"int": "INT", "float": "FLOAT", "bool": "true|false"}.get(annotation, "TEXT")


def _field_comments() -> dict[str, str]:
    """Each TrainConfig field's trailing comment in lgvq/config.py (with the comment lines
    that continue it), joined into one line: the options' descriptions are written once."""
    source = inspect.getsource(lgvq.config.TrainConfig).splitlines()
    comments: dict[str, str] = {}
    current = None
    for line in source:
        field = re.match(r"\s{4}(\w+): [^=]+=.*?#\s?(.*)$", line)
        if field:
            current = field.group(1)
            comments[current] = field.group(2).strip()
            continue
        continued = re.match(r"\s{4}#(?!\s*-)\s?(.*)$", line)
        if continued and current is not None:
            comments[current] += " " + continued.group(1).strip()
        else:
            current = None
    return comments


def train_options(preset: str = DEFAULT_PRESET) -> list[Option]:
    """Every TrainConfig field as a command-line option, with its value under ``preset``."""
    defaults = build_config(preset).to_dict()
    comments = _field_comments()
    return [Option(field.name, _kind(str(field.type)), defaults[field.name],
                   comments.get(field.name, ""))
            for field in dataclasses.fields(TrainConfig)]


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def _print_options(options: list[Option]) -> None:
    width = max(len(f"--{o.name}={o.kind}") for o in options) + 2
    for option in options:
        flag = f"--{option.name}={option.kind}"
        print(f"  {flag:<{width}}{option.description} [default: {_show(option.default)}]")


def _train_help() -> None:
    print("usage: lgvq train [--preset=NAME] [--key=value ...]\n"
          "       lgvq train --out_dir=DIR --resume [--steps=N ...]\n\n"
          f"Defaults are what a bare `lgvq train` runs (--preset={DEFAULT_PRESET}); "
          "`lgvq presets` shows what each preset sets.\nWith --resume the run's stored config "
          f"is used; only {', '.join('--' + k for k in RESUME_SAFE_KEYS[:5])} may change.\n"
          "\noptions:")
    _print_options(train_options() + [Option(
        "tensorboard", "true|false", False, "also log the metrics.csv rows to out_dir/tensorboard "
        "(needs the tensorboard package; not stored in the run's config)")])


def _eval_help() -> None:
    print("usage: lgvq eval CHECKPOINT [--key=value ...]\n\noptions:")
    _print_options([Option(name, _kind(kind.__name__), default, text)
                    for name, (kind, default, text) in EVAL_OPTIONS.items()])


class TensorBoardMirror:
    """Mirrors the rows of a run's metrics.csv into TensorBoard event files in
    ``out_dir/tensorboard`` while it trains (polled every ``interval`` seconds, and once more
    when closed), so training itself knows nothing of TensorBoard."""

    def __init__(self, out_dir: Path, interval: float = 2.0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package (pip install "
                             "tensorboard); the metrics are in metrics.csv without it") from None
        self.metrics = out_dir / "metrics.csv"
        self.folder = out_dir / "tensorboard"
        self.writer = None
        self.writer_class = SummaryWriter
        self.logged_step = self._last_step() if self.folder.exists() else 0
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _rows(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as stream:
            return list(csv.DictReader(stream))

    def _last_step(self) -> int:
        return max((int(row["step"]) for row in self._rows()), default=0)

    def sync(self) -> None:
        for row in self._rows():
            step = int(row["step"])
            if step <= self.logged_step:
                continue
            if self.writer is None:  # the folder appears with the first row
                self.writer = self.writer_class(str(self.folder))
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", float(value), step)
            self.logged_step = step
        if self.writer is not None:
            self.writer.flush()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self.sync()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sync()
        if self.writer is not None:
            self.writer.close()


def _wants_help(arguments: list[str]) -> bool:
    return any(argument in ("-h", "--help") for argument in arguments)


def _train(arguments: list[str]) -> int:
    if _wants_help(arguments):
        _train_help()
        return 0
    overrides = parse_overrides(arguments)
    # a command-line option, not part of the run's config
    tensorboard = _flag("tensorboard", overrides.pop("tensorboard", "false"))
    if overrides.get("resume", "false").lower() in ("1", "true", "yes", "on"):
        # the run's own config, from its checkpoint; flags may only change what is safe
        out_dir = overrides.pop("out_dir", None) or build_config(
            overrides.get("preset", DEFAULT_PRESET)).out_dir
        config = resume_config(out_dir, overrides)
    else:
        preset = overrides.pop("preset", DEFAULT_PRESET)
        config = build_config(preset, overrides)
    out_dir = Path(config.out_dir)
    new_folder = not out_dir.exists()
    mirror = TensorBoardMirror(out_dir) if tensorboard else None
    try:
        path = train(config)
    except TrainingInterrupted as stop:
        print(f"lgvq train: {stop}; continue with: lgvq train --out_dir={config.out_dir} "
              "--resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        _remove_if_empty(out_dir, new_folder)
        print("lgvq train: interrupted before the first step; nothing was saved",
              file=sys.stderr)
        return 130
    except BaseException:
        _remove_if_empty(out_dir, new_folder)  # a failed start leaves no empty run folder
        raise
    finally:
        if mirror is not None:
            mirror.close()
    print(f"lgvq: checkpoint written to {path}")
    return 0


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--{name} expects true/false, got {value!r}")


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created and folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _eval_options(arguments: list[str]) -> dict:
    options = {}
    for key, value in parse_overrides(arguments).items():
        if key not in EVAL_OPTIONS:
            raise ValueError(f"unknown option --{key}; lgvq eval takes "
                             f"{', '.join('--' + k for k in EVAL_OPTIONS)}")
        kind = EVAL_OPTIONS[key][0]
        try:
            options[key] = kind(value)
        except ValueError:
            raise ValueError(f"--{key} expects {_kind(kind.__name__)}, got {value!r}") from None
        if kind is int and options[key] < 0:
            raise ValueError(f"--{key} must be >= 0, got {value!r}")
    return options


def _eval(arguments: list[str]) -> int:
    if _wants_help(arguments):
        _eval_help()
        return 0
    if not arguments or arguments[0].startswith("--"):
        print("lgvq eval: give the checkpoint path first\n" + USAGE, file=sys.stderr)
        return 2
    options = _eval_options(arguments[1:])
    print(f"lgvq eval: loading {arguments[0]} and evaluating its held-out images...",
          file=sys.stderr, flush=True)
    report = evaluate_checkpoint(arguments[0], out=options.get("out") or None,
                                 images=options.get("images") or None,
                                 device=options.get("device", "auto"))
    print(f"lgvq: evaluation report written to {report}")
    return 0


def _probe(arguments: list[str]) -> int:
    from lgvq.evaluation import probe

    if _wants_help(arguments):
        print("usage: lgvq probe CHECKPOINT [--out=FILE.json] [--key=value ...]\n")
        print(probe.__doc__.strip())
        print("\nkeys: " + ", ".join(probe.PROBE_KEYS))
        return 0
    if not arguments or arguments[0].startswith("--"):
        print("lgvq probe: give the checkpoint path first\n" + USAGE, file=sys.stderr)
        return 2
    overrides = parse_overrides(arguments[1:])
    out = overrides.pop("out", "") or str(Path(arguments[0]).with_name("probe.json"))
    scores = probe.probe_heads(arguments[0], overrides, out=out, progress=True)
    keys = ["recall_at_1_one_word", "recall_at_1_one_word_shuffled_images",
            "recall_gap_one_word", "retrieval_8way_top1"]
    print("\n".join(f"{key}: {scores[key]:.4f}" for key in keys if key in scores))
    print(f"lgvq: probe scores written to {out}")
    return 0


def _presets() -> int:
    base = TrainConfig().to_dict()
    print(f"A bare `lgvq train` runs --preset={DEFAULT_PRESET}. Each preset sets, over the "
          "defaults of `lgvq train --help` without a preset:")
    for name in sorted(PRESETS):
        changed = {k: v for k, v in build_config(name).to_dict().items()
                   if k != "preset" and v != base[k]}
        print(f"\n--preset={name}")
        for key, value in changed.items():
            print(f"  --{key}={_show(value)}")
    return 0


def _raised_by_data_loading(error: BaseException) -> bool:
    """True when the exception came from reading the user's data set (lgvq/data): its message
    says what is wrong with the data, so it is shown as one line."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    data = str(Path(lgvq.config.__file__).parent / "data") + os.sep  # not data_parallel.py
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "downstream":  # its own parser, errors and --help (lgvq.downstream.cli)
        from lgvq.downstream.cli import main as downstream_main
        return downstream_main(rest)
    try:
        if verb == "train":
            return _train(rest)
        if verb == "eval":
            return _eval(rest)
        if verb == "presets":
            return _presets()
        if verb == "probe":
            return _probe(rest)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"lgvq {verb}: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:
        if not _raised_by_data_loading(error):
            raise
        print(f"lgvq {verb}: error: {error}", file=sys.stderr)
        return 2
    print(f"lgvq: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

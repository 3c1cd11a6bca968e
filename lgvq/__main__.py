"""`lgvq` / `python -m lgvq`: the command line.

  lgvq train [--preset=shapes] [--key=value ...]     train LG-VQ (or --language_guidance=false)
  lgvq train --out_dir=runs/x --resume               continue from runs/x/last.safetensors
  lgvq eval CHECKPOINT [--out=report.md] [--images=N] evaluate a checkpoint into a report
  lgvq presets                                       list presets and config keys
  lgvq downstream TASK --tokenizer=CKPT              generation on a tokenizer's codes (--help)
"""

from __future__ import annotations

import dataclasses
import sys

from lgvq.config import PRESETS, TrainConfig, build_config, parse_overrides
from lgvq.evaluation.evaluate import evaluate_checkpoint
from lgvq.training import train

USAGE = __doc__


def _train(arguments: list[str]) -> int:
    overrides = parse_overrides(arguments)
    preset = overrides.pop("preset", "shapes")
    config = build_config(preset, overrides)
    path = train(config)
    print(f"lgvq: checkpoint written to {path}")
    return 0


def _eval(arguments: list[str]) -> int:
    if not arguments or arguments[0].startswith("--"):
        print("lgvq eval: give the checkpoint path first\n" + USAGE, file=sys.stderr)
        return 2
    options = parse_overrides(arguments[1:])
    report = evaluate_checkpoint(arguments[0], **options)
    print(f"lgvq: evaluation report written to {report}")
    return 0


def _presets() -> int:
    print("presets:", ", ".join(sorted(PRESETS)))
    for field in dataclasses.fields(TrainConfig):
        print(f"  --{field.name}={field.default!r}")
    return 0


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
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"lgvq {verb}: error: {error}", file=sys.stderr)
        return 2
    print(f"lgvq: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`lgvq downstream TASK --tokenizer=CKPT [--key=value ...]`: train a generation or
understanding task on a frozen tokenizer's codes, then evaluate it (report.md, metrics.json and
samples.png or predictions.jsonl in out_dir).

  lgvq downstream generate  --tokenizer=runs/demo/lgvq_seed0/last.safetensors
  lgvq downstream complete  --tokenizer=CKPT [--completion_rows=4]
  lgvq downstream t2i       --tokenizer=CKPT [--guidance_scale=2]
  lgvq downstream semantic  --tokenizer=CKPT
  lgvq downstream caption   --tokenizer=CKPT [--beam_size=3] [--text_vocab=full]
  lgvq downstream vqa       --tokenizer=CKPT [--qa_folder=DIR]
  lgvq downstream ground    --tokenizer=CKPT [--ref_folder=DIR]
  lgvq downstream TASK --help                  the task and every --key with its default

--out_dir defaults to runs/downstream/TASK; --resume continues its checkpoint. Data parallel
like `lgvq train`: torchrun --nproc_per_node=N -m lgvq downstream TASK ... (rank 0 evaluates).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from lgvq.config import parse_overrides
from lgvq.downstream.evaluation import evaluate_task
from lgvq.downstream.tasks import TASKS, DownstreamConfig, train_task

USAGE = __doc__
TASK_HELP = {
    "generate": "unconditional generation: a causal code transformer after a start token",
    "complete": "image completion: the causal model completes the lower rows of held-out "
                "codes; PSNR of the lower half against the held-out image",
    "t2i": "text-to-image: a MaskGIT masked-code generator cross-attending to the frozen text "
           "encoder's token features (--guidance_scale: classifier-free guidance)",
    "semantic": "semantic synthesis: the causal model after a prefix of one segmentation label "
                "per code cell (captioned shapes: exact masks from the renderer)",
    "caption": "captioning (ClipCap-style): the codes, embedded from the codebook, prefix a "
               "causal text decoder over the text encoder's WordPiece tokens; greedy and beam "
               "(--beam_size) decoding scored by BLEU-4, ROUGE-L, METEOR, CIDEr-D",
    "vqa": "VQA: codes + question tokens -> transformer -> answer classifier; captioned "
           "shapes: exact generated questions; real data: --qa_folder (COCO-QA-style JSONL)",
    "ground": "visual grounding (TransVG-like): codes + referring expression -> box, "
              "Acc@IoU>0.5; real data: --ref_folder (RefCOCO-style JSONL)",
}


def _join_spaced(arguments: list[str]) -> list[str]:
    """Accept ``--key value`` as well as ``--key=value`` (e.g. ``--tokenizer CKPT``)."""
    joined, index = [], 0
    while index < len(arguments):
        argument = arguments[index]
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if (argument.startswith("--") and "=" not in argument and following is not None
                and not following.startswith("--")):
            joined.append(f"{argument}={following}")
            index += 2
        else:
            joined.append(argument)
            index += 1
    return joined


def task_help(task: str) -> str:
    lines = [f"lgvq downstream {task} --tokenizer=CKPT [--key=value ...]", "",
             TASK_HELP[task], "", "options (default):"]
    lines += [f"  --{f.name}={f.default!r}" for f in dataclasses.fields(DownstreamConfig)
              if f.name != "task"]
    return "\n".join(lines)


def run(task: str, arguments: list[str]) -> dict:
    overrides = parse_overrides(_join_spaced(arguments))
    if "task" in overrides:
        raise ValueError("the task is the verb (lgvq downstream TASK), not --task")
    overrides.setdefault("out_dir", f"runs/downstream/{task}")
    config = DownstreamConfig.from_dict({**overrides, "task": task})
    if not config.tokenizer:
        raise ValueError("--tokenizer=CKPT is required (an `lgvq train` checkpoint)")
    from lgvq.downstream.codes import load_tokenizer
    from lgvq_kernels import resolve_device

    tokenizer = load_tokenizer(config.tokenizer, device=resolve_device(config.device))
    checkpoint = train_task(config, tokenizer=tokenizer)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # data parallel: rank 0 evaluates
    return evaluate_task(config, checkpoint, tokenizer)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"lgvq downstream: unknown task {task!r}; choose one of {', '.join(TASKS)}",
              file=sys.stderr)
        return 2
    if any(argument in ("-h", "--help") for argument in rest):
        print(task_help(task))
        return 0
    try:
        scores = run(task, rest)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"lgvq downstream {task}: error: {message}", file=sys.stderr)
        return 2
    for key, value in scores.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

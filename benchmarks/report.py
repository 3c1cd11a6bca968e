"""Run benchmark providers x shapes x dtypes, print a markdown table and the targets of
docs/benchmarks.md, and save the results (CSV rows appended, a dated markdown file, a PNG plot).

    python -m benchmarks.report --quick                      # small shapes, < ~1 minute
    python -m benchmarks.report                              # the full CPU set (minutes)
    python -m benchmarks.report --ops nearest_code --shapes 16384x16384x256 65536x16384x8
    python -m benchmarks.report --device cuda --shapes gpu --dtypes float32 tf32 bfloat16

Columns: median / p20–p80 (seconds per call after warm-up), speed-up vs the op's baseline
(baseline median / this median), "x <floor>" (this median / the floor's median, e.g. the bare
GEMM), peak extra memory in MiB (see benchmarks/harness/memory.py for how it is measured).
Targets are evaluated from the measured numbers: MET / NOT MET / NOT MEASURED.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time

import torch

from benchmarks import harness
from lgvq.files import atomic_path, atomic_write
from lgvq_kernels import resolve_device

DEFAULT_OUT = os.path.join(harness.REPO_ROOT, "benchmarks", "results")
CSV_NAME = "results.csv"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the 'quick' shape set, 5 repeats, short warm-up (CI / demo)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="op families to run (default: every benchmarks/<op>.py)")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="shape set names (quick, full, gpu, bench) and/or shapes such as "
                             "16384x16384x256 or 8192x16384x8:cosine (default: full, or quick "
                             "with --quick)")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="provider ids to run (default: all of the op)")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                        help=f"dtype modes: {', '.join(harness.DTYPES)} (default: the op's "
                             "default for the device)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="results folder (CSV appended, markdown and PNG written)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no files")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-extra-memory measurement")
    parser.add_argument("--repeats", type=int, help="timed samples per case (default 7; 5 quick)")
    parser.add_argument("--max-case-seconds", type=float,
                        help="cut repeats (down to 3) when a case would take longer "
                             "(default 20; 2 quick)")
    parser.add_argument("--memory-budget-gib", type=float,
                        help="skip a case whose estimated memory exceeds this (default: 75%% of "
                             "available RAM, 85%% of GPU memory)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tag", default=None,
                        help="suffix of the markdown/PNG file names (default: 'quick' with "
                             "--quick)")
    parser.add_argument("--summary", metavar="PATH",
                        help="also write the compact per-shape table (markdown) to PATH")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _by_case(rows):
    return {(row.shape_json, row.dtype, row.provider): row for row in rows}


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _ok_median(row):
    return row.median_s if row is not None and row.status == "ok" else None


def results_table(family: harness.OpFamily, rows: list[harness.Row]) -> str:
    """The full markdown table: one line per (shape, dtype, provider)."""
    cases = _by_case(rows)
    baseline = family.providers[family.baseline].label if family.baseline in family.providers \
        else None
    header = ["shape", "dtype", "provider", "median", "p20–p80"]
    if baseline:
        header.append(f"speed-up vs {baseline}")
    if family.floor:
        header.append(f"x {family.floor_label}")
    header += ["peak extra MiB", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.shape, row.dtype, row.provider_label]
        if row.status == "ok":
            spread = f"{harness.format_seconds(row.p20_s)} – {harness.format_seconds(row.p80_s)}"
            cells += [harness.format_seconds(row.median_s), spread]
        else:
            cells += ["—", "—"]
        if baseline:
            base = _ok_median(cases.get((row.shape_json, row.dtype, family.baseline)))
            cells.append(_fmt_ratio(_ratio(base, _ok_median(row))))
        if family.floor:
            floor = _ok_median(cases.get((row.shape_json, row.dtype, family.floor)))
            cells.append(_fmt_ratio(_ratio(_ok_median(row), floor)))
        cells.append(harness.format_mib(row.peak_extra_bytes))
        note = "unavailable (see below)" if row.unavailable else row.note
        if row.status == "error":
            note = "ERROR: " + note
        cells.append(note.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(family: harness.OpFamily, rows: list[harness.Row]) -> str:
    """Compact table: one line per (shape, dtype), medians per provider, our ratios."""
    cases = _by_case(rows)
    providers = [name for name in family.providers if any(
        row.provider == name and row.status == "ok" for row in rows)]
    ours = [name for name in providers if name.startswith("lgvq-")]
    header = ["shape", "dtype"] + [family.providers[name].label for name in providers]
    for name in ours:
        if family.baseline in providers:
            header.append(f"{name} speed-up")
        if family.floor in providers:
            header.append(f"{name} x {family.floor_label}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = []
    for row in rows:
        key = (row.shape_json, row.dtype)
        if key in seen:
            continue
        seen.append(key)
        cells = [row.shape, row.dtype]
        cells += [harness.format_seconds(_ok_median(cases.get(key + (name,))))
                  for name in providers]
        for name in ours:
            mine = _ok_median(cases.get(key + (name,)))
            if family.baseline in providers:
                cells.append(_fmt_ratio(_ratio(_ok_median(cases.get(key + (family.baseline,))),
                                               mine)))
            if family.floor in providers:
                cells.append(_fmt_ratio(_ratio(mine, _ok_median(cases.get(key + (family.floor,))))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unavailable_lines(rows: list[harness.Row]) -> list[str]:
    reasons = {}
    for row in rows:
        if row.unavailable:
            reasons.setdefault(row.provider, row.note)
    return [f"- {name}: {reason}" for name, reason in reasons.items()]


def load_line(rows: list[harness.Row]) -> str:
    loads = [row.load_avg for row in rows if row.load_avg is not None]
    if not loads:
        return "load average: unknown"
    cores = os.cpu_count() or 1
    text = (f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} "
            f"({cores} cores)")
    if max(loads) > cores:
        text += (" — WARNING: the machine was busy (load above the core count); timings are "
                 "unreliable, rerun on an idle machine")
    return text


def memory_line(run: harness.RunInfo, device: torch.device, measured: bool) -> str:
    if not measured:
        return "peak extra memory: not measured (--no-memory)"
    if device.type == "cuda":
        return ("peak extra memory: torch.cuda.max_memory_allocated during one call after a "
                "warm-up call, minus memory_allocated before it (inputs)")
    noise = "" if run.memory_noise_bytes is None else \
        f", noise floor {run.memory_noise_bytes / harness.MiB:.2f} MiB"
    return (f"peak extra memory: CPU resident memory in a worker process, method "
            f"{run.memory_method or 'n/a'}{noise} (see benchmarks/README.md)")


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def plot(family: harness.OpFamily, rows: list[harness.Row], path: str, title: str) -> str | None:
    """Grouped bars (log scale) of median time per provider per shape, one panel per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no plot: matplotlib is not importable ({error})"
    ok = [row for row in rows if row.status == "ok"]
    if not ok:
        return "no plot: no measured case"
    dtypes = list(dict.fromkeys(row.dtype for row in ok))
    providers = [name for name in family.providers if any(row.provider == name for row in ok)]
    shapes = list(dict.fromkeys(row.shape for row in rows))
    cases = {(row.shape, row.dtype, row.provider): row for row in ok}
    figure, axes = plt.subplots(len(dtypes), 1, squeeze=False,
                                figsize=(max(8.0, 1.3 * len(shapes) * max(1, len(providers)) / 3),
                                         4.2 * len(dtypes)))
    width = 0.8 / max(1, len(providers))
    colors = plt.get_cmap("tab10")
    for axis, dtype in zip(axes[:, 0], dtypes):
        for index, name in enumerate(providers):
            xs, heights = [], []
            for position, shape in enumerate(shapes):
                row = cases.get((shape, dtype, name))
                if row is not None:
                    xs.append(position - 0.4 + width * (index + 0.5))
                    heights.append(row.median_s * 1e3)
            axis.bar(xs, heights, width=width, label=family.providers[name].label,
                     color=colors(index % 10))
        axis.set_yscale("log")
        axis.set_ylabel("median time per call (ms, log)")
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
        axis.set_title(f"{family.name} — {dtype}", fontsize=10)
        axis.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    _save_figure(plt, figure, title, path)
    return None


def _problem_size(shape: dict) -> int:
    """The product of a shape's whole-number fields: N*K*D for nearest code and quantizer."""
    size = 1
    for value in shape.values():
        if isinstance(value, int):
            size *= value
    return size


def speedup_plot(family: harness.OpFamily, rows: list[harness.Row], path: str,
                 title: str) -> str | None:
    """Speed-up over the op's baseline (log) against the problem size N*K*D (log), one series
    per provider, one panel per dtype: a provider below 1 anywhere, or a dip at some size, shows
    at a glance. Shapes whose word fields depart from their defaults (cosine) are a separate,
    dotted series with hollow markers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no speed-up plot: matplotlib is not importable ({error})"
    if not family.baseline:
        return "no speed-up plot: the op has no baseline"
    ok = [row for row in rows if row.status == "ok"]
    cases = _by_case(ok)
    dtypes = list(dict.fromkeys(row.dtype for row in ok))
    providers = [name for name in family.providers
                 if name != family.baseline and any(row.provider == name for row in ok)]
    if not dtypes or not providers:
        return "no speed-up plot: no measured pair"
    figure, axes = plt.subplots(len(dtypes), 1, squeeze=False, figsize=(8.5, 4.6 * len(dtypes)))
    colors, markers = plt.get_cmap("tab10"), "osD^v<>ph*"
    defaults = {name: words[0] for name, words in family.shape_format.words.items()} \
        if family.shape_format else {}
    for axis, dtype in zip(axes[:, 0], dtypes):
        for index, name in enumerate(providers):
            series: dict[str, list[tuple[int, float]]] = {}  # "" or e.g. "cosine" -> points
            for row in ok:
                if row.provider != name or row.dtype != dtype:
                    continue
                shape = row.shape_dict
                words = " ".join(str(shape[key]) for key, value in defaults.items()
                                 if shape.get(key, value) != value)
                speedup = _ratio(_ok_median(cases.get((row.shape_json, dtype, family.baseline))),
                                 row.median_s)
                if speedup:
                    series.setdefault(words, []).append((_problem_size(shape), speedup))
            color = colors(index % 10)
            for words, points in sorted(series.items()):
                points.sort()
                axis.plot([x for x, _ in points], [y for _, y in points],
                          marker=markers[index % len(markers)], linestyle=":" if words else "-",
                          color=color, markerfacecolor="none" if words else color,
                          label=family.providers[name].label + (f" ({words})" if words else ""))
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("problem size (product of the shape's sizes, N*K*D)")
        baseline = family.providers[family.baseline].label
        axis.set_ylabel(f"speed-up vs {baseline} (log)")
        axis.set_title(f"{family.name} — {dtype}: above 1 is faster than the baseline",
                       fontsize=10)
        axis.grid(which="both", alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    _save_figure(plt, figure, title, path)
    return None


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(harness.cpu_model())}-{os.cpu_count()}c"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(f"--device: {error}") from None
    families = harness.discover()
    ops = args.ops or list(families)
    for op in ops:
        if op not in families:
            raise SystemExit(f"--ops: unknown op family {op!r}; known: {', '.join(families)}")
    known_providers = {name for op in ops for name in families[op].providers}
    if args.providers and (unknown := sorted(set(args.providers) - known_providers)):
        raise SystemExit(f"--providers: unknown {unknown}; known: {sorted(known_providers)}")
    if args.dtypes and (unknown := sorted(set(args.dtypes) - set(harness.DTYPES))):
        raise SystemExit(f"--dtypes: unknown {unknown}; known: {list(harness.DTYPES)}")
    timing = harness.TimingConfig()
    if args.quick:
        timing = harness.TimingConfig(repeats=5, warmup_s=0.05, max_case_s=2.0)
    if args.repeats:
        timing.repeats = args.repeats
    if args.max_case_seconds:
        timing.max_case_s = args.max_case_seconds
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * harness.GiB)
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    command = "python -m benchmarks.report " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))

    run = harness.new_run_info(device)
    print(f"# lgvq benchmarks — {run.date}")
    print(f"machine: {run.device}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in run.versions.items()))
    failures = 0
    summaries = []
    for op in ops:
        family = harness.get_family(op)
        try:
            shapes = family.shapes(args.shapes or (["quick"] if args.quick else ["full"]))
        except ValueError as error:
            raise SystemExit(f"--shapes: {error}") from None
        providers = args.providers or list(family.providers)
        if len(ops) > 1:  # --providers names providers of several families: keep this one's
            providers = [name for name in providers if name in family.providers]
            if not providers:
                continue
        dtypes = args.dtypes or list(family.default_dtypes.get(device.type, ("float32",)))
        started = time.perf_counter()
        rows = harness.run_cases(family, shapes, providers, dtypes, device, timing=timing,
                                 memory=not args.no_memory, memory_budget_bytes=budget, run=run,
                                 progress=lambda text: print(
                                     f"  {time.perf_counter() - started:7.1f}s {text}",
                                     file=sys.stderr, flush=True))
        elapsed = time.perf_counter() - started
        failures += sum(row.status == "error" for row in rows)

        table = results_table(family, rows)
        targets = family.targets(rows) if family.targets else []
        unavailable = unavailable_lines(rows)
        memory = memory_line(run, device, not args.no_memory)
        load = load_line(rows)
        print(f"\n## {op} ({len(rows)} cases, {elapsed:.0f} s)\n")
        print(table)
        print(f"\n{memory}\n{load}")
        if unavailable:
            print("\nunavailable providers:")
            print("\n".join(unavailable))
        if targets:
            print("\ntargets (docs/benchmarks.md, from the numbers above):")
            for target in targets:
                print("  " + target.line())
        summary = summary_table(family, rows)
        summaries.append(f"### {op} on {run.device}\n\n{summary}")

        if args.no_save:
            continue
        stem = f"{run.date[:10]}_{op}_{device_slug(device)}" + (f"_{slug(tag)}" if tag else "")
        markdown_path = os.path.join(args.out, stem + ".md")
        images = image_stem(stem, run.run_id, os.path.exists(markdown_path))
        section = "\n".join([
            f"## {op} — {run.date} (run {run.run_id})", "",
            f"- machine: {run.device}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in run.versions.items()),
            f"- command: `{command}`",
            f"- timing: wall clock, median of 3 to {timing.repeats} samples after warm-up; "
            "p20–p80 spread; first call excluded",
            f"- {memory}", f"- {load}", "", table, "",
            *(["Unavailable providers:", "", *unavailable, ""] if unavailable else []),
            *(["Targets (docs/benchmarks.md), from these numbers:", "",
               *[f"- {t.line()}" for t in targets], ""] if targets else []),
            f"![{op}]({images}.png)", "", f"![{op} speed-up]({images}_speedup.png)", "", ""])
        previous = ""
        if os.path.exists(markdown_path):
            with open(markdown_path) as f:
                previous = f.read()
        atomic_write(markdown_path, (previous or f"# {op} benchmarks\n\n") + section)
        csv_path = harness.append_csv(os.path.join(args.out, CSV_NAME), rows)
        written = [csv_path, markdown_path]
        if not args.no_plot:
            png_path = os.path.join(args.out, images + ".png")
            problem = plot(family, rows, png_path, f"{op} — {run.device[:110]}")
            if problem:
                print(problem)
            else:
                written.append(png_path)
            speedup_path = os.path.join(args.out, images + "_speedup.png")
            problem = speedup_plot(family, rows, speedup_path,
                                   f"{op} speed-up — {run.device[:110]}")
            if problem:
                print(problem)
            else:
                written.append(speedup_path)
        print("\nwritten: " + ", ".join(os.path.relpath(p) for p in written))

    if args.summary:
        atomic_write(args.summary, "\n\n".join(summaries) + "\n")
    if failures:
        print(f"\n{failures} case(s) failed with an error (see the note column)")
    return 1 if failures else 0


def image_stem(stem: str, run_id: str, appending: bool) -> str:
    """The file stem of a run's two plots. The first run of a day (op, machine) writes
    ``<stem>.png``; a later run that day appends its section to the same markdown file and
    names its plots after its run id, so that every section keeps showing its own numbers
    (they used to share one pair of files, the last run's)."""
    return f"{stem}_{run_id}" if appending else stem


def _save_figure(plt, figure, title: str, path: str) -> None:
    """Title, lay out and write ``figure`` as a PNG atomically, then close it."""
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())


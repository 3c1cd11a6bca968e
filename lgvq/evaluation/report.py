"""Evaluation reports: mean ± std over seeds, a markdown table (e.g. baseline vs LG-VQ side by
side) and PNG image grids. Every file is written atomically (lgvq.files), so no partial file is
ever left where a good one stood.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lgvq.files import atomic_write

__all__ = [
    "MeanStd",
    "format_cell",
    "mean_and_std",
    "save_image_grid",
    "write_markdown_report",
]


class MeanStd(NamedTuple):
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of ``count`` values."""

    mean: float
    std: float
    count: int

    def format(self, float_format: str = "{:.4g}") -> str:
        """``"mean ± std"`` (just the mean when there is one value)."""
        if self.count == 1:
            return float_format.format(self.mean)
        return f"{float_format.format(self.mean)} ± {float_format.format(self.std)}"

    def __str__(self) -> str:
        return self.format()


def mean_and_std(values: Iterable[float]) -> MeanStd:
    """Mean ± sample standard deviation (ddof = 1) of per-seed results, e.g. PSNR of 3 seeds.

    ``values``: floats, ints or 0-d tensors (at least one). One value gives std 0.
    """
    numbers = [float(value) for value in values]
    if not numbers:
        raise ValueError("mean_and_std needs at least one value")
    mean = math.fsum(numbers) / len(numbers)
    if len(numbers) == 1:
        return MeanStd(mean, 0.0, 1)
    variance = math.fsum((number - mean) ** 2 for number in numbers) / (len(numbers) - 1)
    return MeanStd(mean, math.sqrt(variance), len(numbers))


def format_cell(value, float_format: str = "{:.4g}") -> str:
    """Text of one table cell: MeanStd as "mean ± std", floats with ``float_format``, None as
    "—", anything else with ``str``; "|" is escaped and line breaks become spaces."""
    if value is None:
        text = "—"
    elif isinstance(value, MeanStd):
        text = value.format(float_format)
    elif isinstance(value, Tensor) and value.numel() == 1:
        text = format_cell(value.item(), float_format)
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float):
        text = float_format.format(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table_lines(rows: Sequence[dict], columns: Sequence[str], float_format: str) -> list[str]:
    lines = ["| " + " | ".join(format_cell(column) for column in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(column), float_format)
                                       for column in columns) + " |")
    return lines


def write_markdown_report(
    path: str | os.PathLike,
    title: str,
    rows: Sequence[dict],
    columns: Sequence[str] | None = None,
    notes: str | Sequence[str] | None = None,
    images: Sequence[str | os.PathLike] = (),
    *,
    float_format: str = "{:.4g}",
    tables: Sequence[tuple[str, Sequence[dict]]] = (),
) -> str:
    """Write a markdown report: a title, one table, notes, further tables and images.

    Args:
        path: the ``.md`` file (written atomically; parent folders created).
        title: the level-1 heading.
        rows: one dict per table row, e.g. ``{"model": "VQ-GAN+LG", "PSNR": mean_and_std(...)}``;
            cells are formatted by :func:`format_cell` (a missing key shows "—").
        columns: the keys to show, in order (also the header); None: every key of the rows in
            order of first appearance.
        notes: a paragraph, or a list of lines written as bullets, after the table.
        images: PNG paths, embedded as ``![name](path)`` with the path relative to the report.
        float_format: format of float cells and of MeanStd parts.
        tables: further ``(heading, rows)`` tables after the notes (columns: their rows' keys).

    Returns:
        The path written, as a str.
    """
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if isinstance(rows, dict) or not all(isinstance(row, dict) for row in rows):
        raise TypeError("rows must be a list of dicts (one per table row)")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    elif isinstance(columns, str):
        raise TypeError("columns must be a list of column names, not one str")
    columns = [str(column) for column in columns]
    if not columns:
        raise ValueError("the table needs at least one column (columns is empty and rows have "
                         "no keys)")
    lines = [f"# {title}", ""]
    lines.extend(_table_lines(rows, columns, float_format))
    if notes:
        lines.append("")
        if isinstance(notes, str):
            lines.append(notes)
        else:
            lines.extend(f"- {note}" for note in notes)
    for heading, table_rows in tables:
        table_columns = list(dict.fromkeys(key for row in table_rows for key in row))
        lines.extend(["", f"## {heading}", "", *_table_lines(table_rows, table_columns,
                                                              float_format)])
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    for image in images:
        image = os.fspath(image)
        relative = os.path.relpath(os.path.abspath(image), folder).replace(os.sep, "/")
        name = os.path.splitext(os.path.basename(image))[0]
        lines.extend(["", f"![{name}]({relative})"])
    return str(atomic_write(path, "\n".join(lines) + "\n"))


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, *,
                    padding: int = 2, pad_value: float = 1.0, scale: int = 1,
                    row_labels: list[str] | None = None) -> str:
    """Save images in [-1, 1] as one PNG grid (atomically, with Pillow).

    Args:
        images: float ``[N, C, H, W]``, C = 3 (RGB) or 1 (grey), values in [-1, 1] (clamped).
        path: the ``.png`` file; parent folders are created.
        nrow: images per grid row (the grid has ceil(N / nrow) rows).
        padding: pixels between images and around the grid.
        pad_value: colour of the padding in [-1, 1] (1 = white).
        scale: each image is enlarged ``scale`` times (nearest neighbour: pixels stay sharp, so
            a 32x32 reconstruction can be judged by eye).
        row_labels: one text per grid row, written in a margin on the left.

    The grid is ``rows * (H + padding) + padding`` pixels high and
    ``min(N, nrow) * (W + padding) + padding`` wide. Returns the path as a str.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, 3 or 1, H, W], got {shape}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must hold at least one non-empty image, got "
                         f"{tuple(images.shape)}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1, got {nrow!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    count, channels, height, width = images.shape
    columns = min(count, nrow)
    grid_rows = math.ceil(count / nrow)
    grid = torch.full((channels, grid_rows * (height + padding) + padding,
                       columns * (width + padding) + padding), float(pad_value))
    pictures = images.detach().float().cpu()
    for index in range(count):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[:, top:top + height, left:left + width] = pictures[index]
    pixels = ((grid.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    # uint8 [H, W] is read as mode "L", [H, W, 3] as "RGB".
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if row_labels is not None:
        if len(row_labels) != grid_rows:
            raise ValueError(f"row_labels must hold one text per grid row ({grid_rows}), got "
                             f"{len(row_labels)}")
        margin = 8 + 7 * max((len(label) for label in row_labels), default=0)
        labelled = Image.new(image.mode, (image.width + margin, image.height), "white")
        labelled.paste(image, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for row, label in enumerate(row_labels):
            middle = (padding + row * (height + padding) + height // 2) * scale
            draw.text((4, middle - 5), label, fill="black")
        image = labelled
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return str(atomic_write(path, buffer.getvalue()))

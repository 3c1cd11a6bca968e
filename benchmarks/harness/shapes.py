"""How an op family writes its shapes: the text the command line takes (``--shapes``) and the
label tables, CSV rows and target lines show. A family declares both once, as templates::

    ShapeFormat("{N}x{K}x{D}[:{metric}]", label="{N}x{K}x{D}[ {metric}]",
                words={"metric": ("l2", "cosine")})

Fields are in braces; a field named in ``words`` takes one of its words (the first is the
default), every other field is a whole number. A bracketed part is optional in the text and is
shown in the label only when its word is not the default. In the text, "x" also reads as "×"
and spaces around ":" are allowed. Every shape may also be written ``key=value,key=value``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

_FIELD = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"(\[[^\[\]]*\])")


def parse_key_values(text: str) -> dict:
    """"N=1024,K=512,metric=l2" -> {"N": 1024, "K": 512, "metric": "l2"}."""
    shape: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"shape item {item!r} is not key=value (in {text!r})")
        key, value = (part.strip() for part in item.split("=", 1))
        shape[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return shape


def _segments(template: str) -> Iterator[tuple[bool, list[tuple[str, str]]]]:
    """(optional, [("field", name) or ("text", literal), ...]) for each part of a template."""
    for segment in filter(None, _OPTIONAL.split(template)):
        optional = segment.startswith("[")
        body = segment[1:-1] if optional else segment
        pieces = _FIELD.split(body)  # literal, field, literal, field, ...
        yield optional, [("field" if index % 2 else "text", piece)
                         for index, piece in enumerate(pieces) if piece]


def _literal_pattern(text: str) -> str:
    replacements = {"x": "[x×]", ":": r"\s*:\s*", " ": r"\s+"}
    return "".join(replacements.get(char) or re.escape(char) for char in text)


class ShapeFormat:
    """An op family's shape text and label (see the module docstring)."""

    def __init__(self, text: str, label: str,
                 words: Mapping[str, tuple[str, ...]] | None = None):
        self.text, self.label_text, self.words = text, label, dict(words or {})
        pattern = ""
        for optional, pieces in _segments(text):
            part = "".join(self._field_pattern(value) if kind == "field"
                           else _literal_pattern(value) for kind, value in pieces)
            pattern += f"(?:{part})?" if optional else part
        self._pattern = re.compile(rf"\s*{pattern}\s*")

    def __repr__(self) -> str:
        return f"ShapeFormat({self.text!r}, label={self.label_text!r}, words={self.words!r})"

    @property
    def fields(self) -> list[str]:
        """Field names in the order of the text (the order of a parsed shape's keys)."""
        return _FIELD.findall(self.text)

    def _field_pattern(self, name: str) -> str:
        if name in self.words:
            return f"(?P<{name}>{'|'.join(map(re.escape, self.words[name]))})"
        return rf"(?P<{name}>\d+)"

    def _usage(self) -> str:
        choices = "".join(f"; {name}: {' or '.join(words)}" for name, words in self.words.items())
        return (f"write {self.text.replace('{', '').replace('}', '')} or "
                f"{','.join(f'{name}=..' for name in self.fields)}{choices}")

    def parse(self, text: str) -> dict:
        """Command-line text -> shape dict, its keys in the order of the fields."""
        match = self._pattern.fullmatch(text)
        if match:
            shape = {name: value if name in self.words else int(value)
                     for name, value in match.groupdict().items() if value is not None}
        elif "=" in text:
            shape = parse_key_values(text)
        else:
            raise ValueError(f"shape {text!r}: {self._usage()}")
        unknown = sorted(set(shape) - set(self.fields))
        missing = sorted(name for name in self.fields
                         if name not in shape and name not in self.words)
        if unknown or missing:
            problems = ([f"lacks {missing}"] if missing else []) + \
                ([f"has unknown {unknown}"] if unknown else [])
            raise ValueError(f"shape {text!r} {' and '.join(problems)}: {self._usage()}")
        for name, words in self.words.items():
            shape.setdefault(name, words[0])
            if shape[name] not in words:
                raise ValueError(f"shape {text!r}: {name} {shape[name]!r} is not one of {words}")
        for name in self.fields:
            if name not in self.words and not isinstance(shape[name], int):
                raise ValueError(f"shape {text!r}: {name} must be a whole number")
        return {name: shape[name] for name in self.fields}

    def label(self, shape: dict) -> str:
        """Shape dict -> the short text tables show ("16384x16384x256", "8192x16384x8 cosine")."""

        def value(name: str) -> Any:
            return shape.get(name, self.words[name][0]) if name in self.words else shape[name]

        def departs(name: str) -> bool:  # a word away from its default, or any size given
            return value(name) != self.words[name][0] if name in self.words else name in shape

        result = ""
        for optional, pieces in _segments(self.label_text):
            names = [piece for kind, piece in pieces if kind == "field"]
            if optional and not any(departs(name) for name in names):
                continue
            result += "".join(str(value(piece)) if kind == "field" else piece
                              for kind, piece in pieces)
        return result

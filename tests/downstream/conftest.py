"""A tiny tokenizer checkpoint (shapes-tiny, 2 steps) shared by the downstream tests."""

import pytest

from lgvq.config import build_config
from lgvq.downstream import load_tokenizer
from lgvq.text import load_text_encoder
from lgvq.training import train

TINY_TOKENIZER = {"steps": 2, "train_images": 16, "eval_images": 16, "batch_size": 4,
                  "checkpoint_every": 2, "sample_every": 2, "log_every": 1}


@pytest.fixture(scope="session")
def text_encoder():
    return load_text_encoder("minilm")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, text_encoder):
    """Path of a 2-step shapes-tiny checkpoint (32 px, 8x8 codes, K = 32)."""
    out_dir = tmp_path_factory.mktemp("tokenizer")
    config = build_config("shapes-tiny", {**TINY_TOKENIZER, "out_dir": str(out_dir)})
    return train(config, text_encoder=text_encoder, progress=False)


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer, text_encoder):
    """The tiny checkpoint loaded as a frozen tokenizer."""
    return load_tokenizer(tiny_tokenizer, text_encoder=text_encoder)


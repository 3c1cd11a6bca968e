"""The shared code-sequence layer: frozen tokenizer loading, clear errors, the code cache."""

import pytest
import torch

from lgvq.data import SceneAttributes
from lgvq.downstream import encode_split, load_tokenizer


def test_tokenizer_is_frozen_and_decodes_its_own_codes(tiny_tokenizer, text_encoder):
    tokenizer = load_tokenizer(tiny_tokenizer, text_encoder=text_encoder)
    assert tokenizer.grid == 8 and tokenizer.codebook_size == 32
    assert not any(p.requires_grad for p in tokenizer.model.parameters())
    assert tokenizer.codebook().shape == (32, tokenizer.config.code_dim)
    codes = torch.randint(0, 32, (2, 8, 8))
    images = tokenizer.decode(codes)
    assert images.shape == (2, 3, 32, 32) and float(images.abs().max()) <= 1


def test_missing_or_corrupt_checkpoint_is_a_one_line_error(tmp_path, text_encoder):
    with pytest.raises(FileNotFoundError, match="--tokenizer: checkpoint not found"):
        load_tokenizer(tmp_path / "none.safetensors", text_encoder=text_encoder)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--tokenizer: .* is not an lgvq train checkpoint") \
            as error:
        load_tokenizer(bad, text_encoder=text_encoder)
    assert "\n" not in str(error.value)


def test_codes_are_cached_by_checkpoint_and_data(tiny_tokenizer, text_encoder, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer, text_encoder=text_encoder)
    first = encode_split(tokenizer, "val", 6, str(tmp_path))
    files = list(tmp_path.glob("codes-val-*.safetensors"))
    assert len(files) == 1 and first.codes.shape == (6, 8, 8)
    assert len(first.captions) == 6 and all(isinstance(a, SceneAttributes)
                                            for a in first.attributes)
    # the same key reads the file (the encoder is not run: break it to prove it)
    forward = tokenizer.model.encode_to_indices
    tokenizer.model.encode_to_indices = None
    again = encode_split(tokenizer, "val", 6, str(tmp_path))
    tokenizer.model.encode_to_indices = forward
    assert torch.equal(again.codes, first.codes) and again.captions == first.captions
    assert again.attributes == first.attributes
    # another data config (or checkpoint) is another file
    encode_split(tokenizer, "val", 4, str(tmp_path))
    tokenizer.digest = "0" * 64
    encode_split(tokenizer, "val", 6, str(tmp_path))
    assert len(list(tmp_path.glob("codes-val-*.safetensors"))) == 3

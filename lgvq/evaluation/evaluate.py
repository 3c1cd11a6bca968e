"""`lgvq eval CHECKPOINT`: PSNR, codebook usage and perplexity, masked-word Recall@1 (1 and 3
masked words), word-to-code relation MSE and image→text retrieval with e_CLS, on held-out
images, written to a markdown report with a reconstruction grid."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lgvq.checkpoint import load_checkpoint, read_checkpoint_metadata
from lgvq.config import TrainConfig
from lgvq.data import ALL_ATTRIBUTE_WORDS, collate_captioned_images
from lgvq.data_parallel import resolve_device
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
from lgvq.text import CLIPTextEncoder, load_text_encoder
from lgvq.training import build_dataset, build_model


def _candidate_words(config: TrainConfig, text_encoder, tokens):
    """Tokens that may be masked: attribute words on captioned shapes, else every real word."""
    if config.dataset != "shapes":
        return tokens.word_mask
    tokenizer = text_encoder.tokenizer
    markers = ({"continuation_prefix": None, "end_of_word_suffix": "</w>"}
               if isinstance(text_encoder, CLIPTextEncoder) else {})  # CLIP BPE vs WordPiece
    return word_token_mask(tokens.ids, tokens.attention_mask, ALL_ATTRIBUTE_WORDS,
                           decode_token=lambda i: tokenizer.convert_ids_to_tokens(int(i)),
                           special_mask=tokens.special_mask, **markers)


@torch.no_grad()
def evaluate_model(model, config: TrainConfig, text_encoder, *, images: int | None = None,
                   batch_size: int = 64, seed: int = 1234, out_dir: Path | None = None) -> dict:
    """Scores of ``model`` on the evaluation split; saves a reconstruction grid in out_dir."""
    model.eval()
    trained = "masked_encoding" if config.mask_before_encoding else "paper_encoding"
    device = next(model.parameters()).device
    dataset = build_dataset(config, "val")
    count = min(len(dataset), images or len(dataset))
    usage = CodebookUsageMeter(config.codebook_size)
    recall = {(protocol, k): MaskedWordRecallMeter()
              for protocol in ("masked_encoding", "paper_encoding", "shuffled_images")
              for k in (1, 3)}
    relation = RelationMSEMeter()
    psnr_sum, image_embeddings, text_embeddings = 0.0, [], []
    grid = None
    for start in range(0, count, batch_size):
        stop = min(count, start + batch_size)
        batch = collate_captioned_images([dataset[i] for i in range(start, stop)])
        images_ = batch["image"].to(device)
        captions = [options[0] for options in batch["captions"]]
        text = text_encoder.encode(captions)
        text = text.to(device)
        _, zq_st, indices, _, _ = model.tokenizer.encode(images_)
        reconstruction = model.tokenizer.decode(zq_st).float()
        if grid is None:
            grid = torch.cat([images_[:8], reconstruction[:8]]).cpu()
        psnr_sum += float(psnr(reconstruction, images_).sum())
        usage.update(indices)
        tokens = zq_st.flatten(2).transpose(1, 2)
        visual = model.visual_encoder(tokens)
        relation.update(text.token_features, text.attention_mask, visual[:, 1:],
                        model.relation.project(tokens))
        image_embeddings.append(model.cls_to_global(visual[:, 0]).cpu())
        text_embeddings.append(text.global_features.cpu())
        candidates = _candidate_words(config, text_encoder, text)

        encoded = {}  # masked ids -> their features: each draw of masks is encoded once
        for protocol in ("masked_encoding", "paper_encoding", "shuffled_images"):
            # shuffled_images: the training protocol with each caption scored against the tokens
            # of another image: how much of the recall comes from the image at all
            def predict(masked_ids, masked, text=text,
                        protocol=trained if protocol == "shuffled_images" else protocol,
                        tokens=zq_st.roll(1, 0) if protocol == "shuffled_images" else zq_st):
                features = text.token_features  # the paper: context from the unmasked caption
                if protocol == "masked_encoding":  # mask, then encode: no leak of the words
                    key = masked_ids.cpu().numpy().tobytes()
                    if key not in encoded:
                        encoded[key] = text_encoder.encode_ids(
                            masked_ids.to(device), text.attention_mask,
                            text.special_mask).token_features
                    features = encoded[key]
                return model.predict_masked_words(tokens, features, masked.to(device),
                                                  text.attention_mask)

            for k in (1, 3):
                recall[protocol, k].update(masked_word_recall(
                    predict, text.ids, text.attention_mask, candidates, k,
                    torch.Generator().manual_seed(seed + 7 * start + k),
                    mask_token_id=text_encoder.mask_token_id))
    codebook = usage.compute()
    retrieval = retrieval_accuracy(torch.cat(image_embeddings), torch.cat(text_embeddings))
    if out_dir is not None and grid is not None:
        save_image_grid(grid, Path(out_dir) / "eval_reconstruction.png", nrow=8)
    return {
        "images": count,
        "psnr_db": psnr_sum / max(count, 1),
        "codebook_usage": float(codebook.used_fraction),
        "perplexity": float(codebook.perplexity),
        # Recall@1 under the protocol the model was trained with, then under both
        "recall_at_1_one_word": recall[trained, 1].compute().recall,
        "recall_at_1_three_words": recall[trained, 3].compute().recall,
        **{f"recall_at_1_{'one_word' if k == 1 else 'three_words'}_{protocol}":
           meter.compute().recall for (protocol, k), meter in recall.items()},
        "relation_mse": relation.compute(),
        **{f"retrieval_{k}": float(v) for k, v in retrieval.items()},
    }


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
                            out_dir=report.parent)
    scores["step"] = meta["step"]
    scores["language_guidance"] = config.language_guidance
    atomic_write(report.parent / "metrics.json", json.dumps(scores, indent=2))
    write_markdown_report(report, f"lgvq evaluation: {path}",
                          [{"metric": k, "value": v} for k, v in scores.items()],
                          columns=["metric", "value"], notes=[],
                          images=[str(report.parent / "eval_reconstruction.png")])
    return report

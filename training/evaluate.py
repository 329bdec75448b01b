"""Validation: captioning loss and token accuracy, retrieval recall@1/@5 within the validation set, generation L2."""

import torch

from .losses import recall_at_k
from .model_forward import empty_on_any_process


def _pad_gather(accelerator, tensor):
    if accelerator.num_processes == 1:
        return tensor
    count = accelerator.gather(torch.tensor([tensor.shape[0]], device=tensor.device))
    padded = accelerator.pad_across_processes(tensor, dim=0)
    gathered = accelerator.gather(padded)
    n_max = padded.shape[0]
    return torch.cat([gathered[r * n_max : r * n_max + int(c)] for r, c in enumerate(count)])


@torch.no_grad()
def evaluate(model, batches, prepare_batch, accelerator) -> dict[str, float]:
    """Runs the training forward (no concatenation) over the validation batches of every process."""
    sums = {"caption": 0.0, "img_token": 0.0, "generation": 0.0, "batches": 0}
    correct = count = 0
    texts, images = [], []
    for batch in batches:
        if empty_on_any_process(batch, accelerator):  # every image unreadable somewhere: all processes skip it
            continue
        batch = prepare_batch(batch)
        out = model(batch)
        sums["caption"] += float(out["caption"])
        sums["img_token"] += float(out["img_token"])
        sums["generation"] += float(out["generation"]) if "generation" in out else 0.0
        sums["batches"] += 1
        correct += int(out["caption_correct"])
        count += int(out["caption_count"])
        texts.append(out["text_embeds"].float())
        images.append(out["image_embeds"].float())
    totals = accelerator.reduce(
        torch.tensor([sums["caption"], sums["img_token"], sums["generation"], sums["batches"], correct, count],
                     device=accelerator.device, dtype=torch.float64),
        reduction="sum",
    )
    batches_seen = max(float(totals[3]), 1.0)
    metrics = {
        "val/caption_loss": float(totals[0]) / batches_seen,
        "val/img_token_loss": float(totals[1]) / batches_seen,
        "val/generation_l2": float(totals[2]) / batches_seen,
        "val/caption_token_accuracy": float(totals[4]) / max(float(totals[5]), 1.0),
    }
    if texts:
        text = _pad_gather(accelerator, torch.cat(texts))
        image = _pad_gather(accelerator, torch.cat(images))
        similarity = text @ image.t()
        for k, value in recall_at_k(similarity).items():
            metrics[f"val/text_to_image_recall@{k}"] = value
        for k, value in recall_at_k(similarity.t()).items():
            metrics[f"val/image_to_text_recall@{k}"] = value
        metrics["val/examples"] = float(text.shape[0])
    return metrics

"""GILL's training losses (paper section 3, reference gill/losses.py and main.py)."""

import torch
import torch.nn.functional as F

from gill_pipeline.decoders import conditioning_mse

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted cross-entropy: position t predicts `labels[t + 1]`; `-100` labels are ignored.

    Returns the mean loss over the labelled tokens, the number of correct argmax predictions and the token count.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    count = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return loss, correct, count


def gather_with_local_grad(x: torch.Tensor, accelerator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All processes' rows of `x` `(n, D)` -> `(world * n_max, D)`; this process's slot keeps its gradient.

    Processes may hold different row counts (skipped images): rows are padded to the largest count and `valid` marks
    the real ones. Returns (gathered rows, valid mask, index of this process's first row).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = accelerator.gather(n)
    n_max = int(sizes.max())
    padded = torch.cat([x, x.new_zeros(n_max - x.shape[0], *x.shape[1:])]) if x.shape[0] < n_max else x
    gathered = accelerator.gather(padded.detach().contiguous())
    rank = accelerator.process_index
    start = rank * n_max
    # Gathered copies carry no gradient; put back the local slot that does (as the reference and open_clip do).
    gathered = torch.cat([gathered[:start], padded, gathered[start + n_max :]])
    valid = (torch.arange(n_max, device=x.device)[None, :] < sizes[:, None]).reshape(-1)
    return gathered, valid, start


def contrastive_loss(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor, logit_scale: torch.Tensor, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the GLOBAL batch (negatives from every process).

    `text_embeds`, `image_embeds`: this process's normalised embeddings `(n, D)`. Returns the loss and the
    text-to-image logits `(global, global)` (invalid padded rows/columns at -inf), whose width is the global batch.
    """
    all_text, valid, _ = gather_with_local_grad(text_embeds, accelerator)
    all_image, _, _ = gather_with_local_grad(image_embeds, accelerator)
    scale = logit_scale.exp()
    logits = scale * all_text.float() @ all_image.float().t()
    logits = logits.masked_fill(~valid[None, :], float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    rows = valid.nonzero()[:, 0]
    loss_t2i = F.cross_entropy(logits[rows], labels[rows])
    loss_i2t = F.cross_entropy(logits.t().masked_fill(~valid[None, :], float("-inf"))[rows], labels[rows])
    return (loss_t2i + loss_i2t) / 2, logits


def generation_l2_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token Euclidean distance (square root of the summed squared difference over the width), averaged over
    tokens and batch. Not a squared MSE: this is the reference's `l2_loss`."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"Mapper output {tuple(prediction.shape)} and SD text-encoder target {tuple(target.shape)} differ in shape."
        )
    return (prediction.float() - target.float()).pow(2).sum(-1).sqrt().mean()


def generation_loss(gill, img_hidden: torch.Tensor, targets) -> torch.Tensor:
    """The generation loss of the mapper for `[IMG]` states `(N, r, D)` against the decoder's own conditioning.

    `targets` is either the `(N, L, W)` text-encoder sequence of Stable Diffusion 1.x/2.x (the reference's per-token
    L2, as GILL always trained), or a dict from the family's `encode_prompt` (`encode_conditioning`: sequence,
    pooled vector, masks), compared by `conditioning_mse` over every learned tensor with padded positions left out
    where the family masks them.
    """
    if isinstance(targets, dict):
        return conditioning_mse(gill.map_to_conditioning(img_hidden), targets, gill.conditioning_layout)["total"]
    return generation_l2_loss(gill.map_to_prompt_embeds(img_hidden), targets)


def recall_at_k(similarity: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Row i's positive is column i; fraction of rows whose positive is among the top-k columns."""
    ranks = (similarity > similarity.diagonal()[:, None]).sum(1)
    return {k: float((ranks < k).float().mean()) for k in ks}

"""The numbers the GILL paper reports, each computed one way for every protocol.

Recall@k, the decision classifier's accuracy and F1, and the CLIP image-image similarity are a few lines each and are
written here. FID and CLIP score come from torchmetrics (`pip install gill-pipeline[eval]`), with the feature networks
passed in: nothing is downloaded. LPIPS is in `lpips.py`.
"""

import itertools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


DEFAULT_RECALL_KS = (1, 5, 10)


def rank_of_first_match(scores: torch.Tensor, matches: Iterable[Iterable[int]]) -> list[int]:
    """1-based rank of the best-placed correct candidate per query.

    Args:
        scores (`torch.Tensor`): `(num_queries, num_candidates)`, higher is better.
        matches: per query, the indices of the candidates that count as correct (e.g. the five COCO captions of an
            image).
    """
    ranks = []
    for row, correct in zip(scores, matches):
        correct = list(correct)
        if not correct:
            raise ValueError("Every query needs at least one correct candidate; one has none.")
        best = row[correct].max()
        # Ties count against the query: a correct candidate scored the same as a wrong one is not ranked above it.
        ranks.append(int((row > best).sum()) + int((row == best).sum() - (row[correct] == best).sum()) + 1)
    return ranks


def recall_at_k(ranks: Iterable[int], ks: Iterable[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """`{"recall@k": fraction of queries whose first correct candidate is ranked k or better}`."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("`ranks` is empty: no query was evaluated.")
    return {f"recall@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}


def decision_report(predicted: list[str], labels: list[str], classes: tuple[str, ...] = ("ret", "gen")) -> dict:
    """Accuracy, and precision / recall / F1 per class and their macro average, of predicted labels."""
    if len(predicted) != len(labels):
        raise ValueError(f"`predicted` has {len(predicted)} labels but `labels` has {len(labels)}.")
    if not labels:
        raise ValueError("`labels` is empty: no prompt was evaluated.")
    report = {"accuracy": sum(p == t for p, t in zip(predicted, labels)) / len(labels), "n": len(labels)}
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(predicted, labels))
        predicted_c, true_c = sum(p == c for p in predicted), sum(t == c for t in labels)
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / true_c if true_c else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report.update({f"precision_{c}": precision, f"recall_{c}": recall, f"f1_{c}": f1, f"n_{c}": true_c})
        f1s.append(f1)
    report["f1_macro"] = sum(f1s) / len(f1s)
    return report


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two `(N, D)` embeddings: the paper's CLIP similarity to the true image."""
    if a.shape != b.shape:
        raise ValueError(f"Embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _require_torchmetrics(what: str):
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} uses torchmetrics: `pip install gill-pipeline[eval]` (or `pip install torchmetrics`).") from None


def frechet_distance(
    feature_network: torch.nn.Module, real_images: Iterable[torch.Tensor], fake_images: Iterable[torch.Tensor]
) -> float:
    """FID between two image sets, by torchmetrics' `FrechetInceptionDistance` with `feature_network` as extractor.

    Args:
        feature_network (`torch.nn.Module`): maps a batch of images `(N, 3, H, W)` in [0, 1] to features
            `(N, F)`, e.g. [`ImageEmbedder`] (CLIP features: "CLIP-FID") or torchmetrics' InceptionV3 built from a
            local weights file (the standard FID; see docs/evaluation.md).
        real_images, fake_images: batches `(N, 3, H, W)` in [0, 1]; at least two images each.
            Each may be a list, a generator or any other iterable of batches, or one `(N, 3, H, W)` tensor (a
            single batch). A generator is read once, every batch of it counted.
    """
    _require_torchmetrics("FID")
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_first, real_batches = _first_and_all_batches(real_images, "real_images")
    fake_first, fake_batches = _first_and_all_batches(fake_images, "fake_images")
    fid = FrechetInceptionDistance(feature=feature_network, normalize=True, input_img_size=tuple(fake_first.shape[1:]))
    for batch in real_batches:
        _check_batch(batch, "real_images")
        fid.update(batch, real=True)
    for batch in fake_batches:
        _check_batch(batch, "fake_images")
        fid.update(batch, real=False)
    return float(fid.compute())


def _check_batch(batch, name: str) -> None:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"`{name}` must yield batches of images `(N, 3, H, W)`, got {shape}.")


def _first_and_all_batches(images, name: str) -> tuple[torch.Tensor, Iterable[torch.Tensor]]:
    """The first batch of `images` (its image size sets up the metric) and every batch, the first included: a
    generator peeked at must not lose what was peeked."""
    if isinstance(images, torch.Tensor):  # one batch; iterating it would yield single images
        _check_batch(images, name)
        return images, [images]
    batches = iter(images)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"`{name}` holds no images: FID needs at least two in each set.")
    _check_batch(first, name)
    return first, itertools.chain([first], batches)


def clip_score(clip_factory: Callable, images: list[torch.Tensor], texts: list[str], batch_size: int = 32) -> float:
    """CLIP score (Hessel et al. 2021: 100 x cosine(image, text), floored at 0, averaged) by torchmetrics'
    `CLIPScore`, with the CLIP given by `clip_factory()` -> `(model, processor)` (see `CLIPTextImageScorer`)."""
    _require_torchmetrics("CLIP score")
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(texts):
        raise ValueError(f"`images` has {len(images)} entries but `texts` has {len(texts)}.")
    metric = CLIPScore(model_name_or_path=clip_factory)
    for start in range(0, len(images), batch_size):
        metric.update(list(images[start : start + batch_size]), list(texts[start : start + batch_size]))
    return float(metric.compute())

"""The similarity floor of a retrieval set (`RetrievalIndex.min_similarity`): checking one, and finding one from
queries whose answer the set does and does not hold."""

import torch


def check_min_similarity(value, name: str) -> float | None:
    """`value` as a cosine-similarity floor (a real number in [-1, 1]) or None; else a ValueError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be None or a cosine similarity in [-1, 1], got {value!r:.100}.")
    return float(value)


def calibrate_min_similarity(present: torch.Tensor, absent: torch.Tensor) -> float:
    """The similarity floor that best tells answers the retrieval set holds from answers it does not.

    Args:
        present (`torch.Tensor`): Best-match similarities of queries whose answer is in the set.
        absent (`torch.Tensor`): Best-match similarities of queries whose answer is not (for instance the same
            queries with their answer excluded, see `RETRIEVAL_ID_INFO_KEY`).

    Returns:
        `float`: The threshold with the highest balanced accuracy (mean of the two recalls), midway between the two
        neighbouring scores; ties go to the lower threshold (retrieval kept where it is as good).
    """
    present, absent = torch.as_tensor(present).float().flatten(), torch.as_tensor(absent).float().flatten()
    if present.numel() == 0 or absent.numel() == 0:
        raise ValueError(f"`present` and `absent` must both be non-empty, got {present.numel()} and {absent.numel()}.")
    if not (torch.isfinite(present).all() and torch.isfinite(absent).all()):
        raise ValueError("`present` and `absent` must be finite similarities.")
    scores = torch.cat([present, absent]).unique()  # sorted
    candidates = torch.cat([scores[:1] - 1e-6, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1e-6])
    kept = (present[None, :] >= candidates[:, None]).float().mean(1)
    refused = (absent[None, :] < candidates[:, None]).float().mean(1)
    balanced = (kept + refused) / 2
    best = int(torch.nonzero(balanced == balanced.max())[0])
    return float(candidates[best].clamp(-1.0, 1.0))

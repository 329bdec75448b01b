"""Calibrates the shapes world's retrieval set: the similarity floor (`RetrievalIndex.min_similarity`) below which
a best match is not the scene asked for, so that the pipeline generates instead of showing a neighbour.

The world's retrieval set holds one image of every circle and square combination of the training scenes, so a
query for a combination it lacks (a held-out one) can only retrieve a neighbour that differs in one attribute. The
floor is learnt from training scenes alone, never from held-out ones: each query is scored twice, once against the
whole set ("present": its scene is there) and once with its own scene's row taken out ("absent": the best a query
for a missing scene can get), and `calibrate_min_similarity` picks the threshold that best separates the two.

Queries are asked in the two forms the bundled model answers: a caption alone (`[caption][IMG]`) and an input image
with its description (`[image][caption][IMG]`, the README demo's form), on new drawings of the scenes.
"""

import random

import torch

from .models import SIZES
from .world import draw, training_scenes


@torch.no_grad()
def similarity_floor(pipe, index, shapes: tuple[str, ...], seed: int, fraction: float = 1.0) -> dict:
    """Scores training queries against `index` (built by `pipe`) and returns the calibrated floor with its figures:
    `{"min_similarity", "present_kept", "absent_refused", "n"}`."""
    from gill_pipeline.evaluation import GILLSystem
    from gill_pipeline.retrieval import calibrate_min_similarity

    rng = random.Random(seed)
    row_of_caption = {record.get("caption"): row for row, record in enumerate(index.records)}
    scenes = [s for s in training_scenes() if s.shape in shapes and s.caption() in row_of_caption]
    scenes = scenes[: max(2, int(len(scenes) * fraction))]
    inputs = [[s.caption()] for s in scenes]
    inputs += [[draw(s, SIZES.image_size, 1, rng.randrange(1 << 30)), s.caption()] for s in scenes]
    rows = torch.tensor([row_of_caption[s.caption()] for s in scenes] * 2)
    system = GILLSystem(pipe)
    queries = torch.cat([system.text_embeds(inputs[i : i + 64]) for i in range(0, len(inputs), 64)])
    similarity = queries @ index.embeddings.float().cpu().T
    present = similarity.max(dim=1).values
    similarity[torch.arange(len(rows)), rows] = -2.0  # the query's own scene taken out of the set
    absent = similarity.max(dim=1).values
    floor = round(calibrate_min_similarity(present, absent), 4)
    return {
        "min_similarity": floor,
        "present_kept": float((present >= floor).float().mean()),
        "absent_refused": float((absent < floor).float().mean()),
        "n": len(rows),
    }

"""Clustered synthetic embeddings shaped like CLIP image embeddings, generated chunk by chunk from a seed.

Exactly how (all from `numpy.random.default_rng`):
- A shared direction `m` (CLIP's image embeddings sit in a cone: random pairs have cosine ~0.4, not ~0).
- `num_clusters` centres `c_j = normalize(CONE * m + g_j / sqrt(dim))`, `g_j ~ N(0, I)`.
- Each cluster has an anisotropic spread: a `dim x rank` basis `B_g ~ N(0, 1/dim)` (`g = j mod BASIS_GROUPS`, 64
  bases shared out among the clusters) whose column `i` is scaled by `SPREAD * (i + 1) ** -0.5` (a few strong
  directions, a decaying tail), plus isotropic noise `NOISE / sqrt(dim)`.
- Cluster sizes follow Zipf weights `p_j ~ (j + 1) ** -ZIPF` (a few big concepts, a long tail), shuffled.
- Row `r` of chunk `t`: cluster `j ~ p`, `x = normalize(c_j + B_j (s * z) + NOISE * e / sqrt(dim))`, `z ~ N(0, I_rank)`,
  `e ~ N(0, I_dim)`, drawn by a torch generator seeded with `seed * 1_000_003 + t` for chunk `t`: any chunk is made
  without the others, so a 100M-row set is streamed and never held in memory.
"""

import numpy as np
import torch

CONE = 1.2
# Clusters share their spread directions in this many groups (cluster j uses basis j mod BASIS_GROUPS): one matrix
# product per group keeps generation at the cost of the random numbers.
BASIS_GROUPS = 64
SPREAD = 0.9
NOISE = 0.45
ZIPF = 0.6


class ClusteredEmbeddings:
    """`chunk(t)`: rows `[t * chunk_rows, (t + 1) * chunk_rows)` of an endless deterministic stream (float32)."""

    def __init__(self, dim: int = 256, num_clusters: int = 4096, rank: int = 16, seed: int = 0,
                 chunk_rows: int = 250_000):
        self.dim, self.num_clusters, self.rank, self.seed, self.chunk_rows = dim, num_clusters, rank, seed, chunk_rows
        rng = np.random.default_rng([seed, 2**31])
        m = rng.standard_normal(dim).astype(np.float32)
        m /= np.linalg.norm(m)
        centres = CONE * m + rng.standard_normal((num_clusters, dim), dtype=np.float32) / np.sqrt(dim)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        scale = (SPREAD * (np.arange(rank) + 1.0) ** -0.5).astype(np.float32)
        self.bases = rng.standard_normal((BASIS_GROUPS, rank, dim), dtype=np.float32) / np.sqrt(dim) * scale[:, None]
        weights = (np.arange(num_clusters) + 1.0) ** -ZIPF
        self.weights = rng.permutation(weights / weights.sum())
        self._weights = torch.from_numpy(self.weights)
        self.centres, self.bases = self.centres.astype(np.float32), self.bases.astype(np.float32)
        self._centres, self._bases = torch.from_numpy(self.centres), torch.from_numpy(self.bases)

    def chunk(self, t: int, rows: int | None = None) -> np.ndarray:
        n = self.chunk_rows if rows is None else rows
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        cluster = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.rank, generator=generator)
        x = torch.randn(n, self.dim, generator=generator).mul_(NOISE / np.sqrt(self.dim))
        x += self._centres[cluster]
        group = cluster % BASIS_GROUPS
        for g in range(BASIS_GROUPS):
            rows_g = (group == g).nonzero()[:, 0]
            x.index_add_(0, rows_g, z[rows_g] @ self._bases[g])
        return torch.nn.functional.normalize(x, dim=1).numpy()

    def rows(self, n: int, first_chunk: int = 0):
        """Yields `(start, chunk)` for the first `n` rows from chunk `first_chunk` on, one chunk at a time."""
        start, t = 0, first_chunk
        while start < n:
            block = self.chunk(t)[: n - start]
            yield start, block
            start += block.shape[0]
            t += 1

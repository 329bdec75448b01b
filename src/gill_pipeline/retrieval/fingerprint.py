"""Which learned weights an index was built with, and whether a pipeline's weights are the same.

Two records are kept: a SHA-256 of the `gill` module's image-side retrieval projection (exact identity, shown in
errors), and probe embeddings: the image-side embeddings of fixed random features and of fixed synthetic images.
Probes are compared with a tolerance, so the same weights loaded in another dtype (bf16 on a GPU) still match, and
they also catch a different vision encoder, which the hash of the projection cannot see.
"""

import hashlib
import json

import numpy as np
import PIL.Image
import torch

PROBE_SEED = 0
NUM_PROBE_FEATURES = 4
NUM_PROBE_IMAGES = 2
PROBE_IMAGE_SIZE = 64
# Lowest cosine similarity between a stored and a recomputed probe embedding that still counts as the same weights.
# bf16 against fp32 stays above 0.99; unrelated weights give about 0.
PROBE_MIN_COSINE = 0.98
PROJECTION_PROBE = "projection_probe"
ENCODER_PROBE = "encoder_probe"


class IndexWeightsMismatchError(ValueError):
    """A retrieval index was built with other learned weights (or another vision encoder) than the pipeline's."""


def _sha256_of_module(module: torch.nn.Module, extra: dict) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _encoder_summary(image_encoder) -> dict | None:
    if image_encoder is None:
        return None
    config = getattr(image_encoder, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"):
        config_dict.pop(volatile, None)
    return {
        "class": type(image_encoder).__name__,
        "config_sha256": hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest(),
    }


def weights_fingerprint(pipe) -> dict:
    """What identifies the image side of `pipe`'s retrieval space (JSON-serialisable)."""
    config = pipe.gill.config
    sizes = {"vision_dim": config.vision_dim, "retrieval_dim": config.retrieval_dim}
    return {
        "ret_image_proj_sha256": _sha256_of_module(pipe.gill.ret_image_proj, sizes),
        **sizes,
        "image_encoder": _encoder_summary(pipe.image_encoder),
    }


def probe_images() -> list[PIL.Image.Image]:
    rng = np.random.RandomState(PROBE_SEED)
    return [
        PIL.Image.fromarray((rng.rand(PROBE_IMAGE_SIZE, PROBE_IMAGE_SIZE, 3) * 255).astype(np.uint8))
        for _ in range(NUM_PROBE_IMAGES)
    ]


@torch.no_grad()
def probe_embeddings(pipe) -> dict[str, torch.Tensor]:
    """Image-side embeddings of fixed inputs: random features (projection only) and synthetic images (whole chain)."""
    gill = pipe.gill
    device = gill.ret_image_proj.weight.device
    generator = torch.Generator().manual_seed(PROBE_SEED)
    features = torch.randn(NUM_PROBE_FEATURES, gill.config.vision_dim, generator=generator)
    probes = {PROJECTION_PROBE: gill.image_retrieval_embeds(features.to(device)).float().cpu()}
    if pipe.image_encoder is not None and pipe.feature_extractor is not None:
        image_features = pipe.encode_image_features(probe_images(), pipe._execution_device)
        probes[ENCODER_PROBE] = gill.image_retrieval_embeds(image_features.to(device)).float().cpu()
    return probes


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("-inf")
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def check_same_weights(index_fingerprint: dict, index_probes: dict[str, torch.Tensor], pipe, where: str) -> None:
    """Raises [`IndexWeightsMismatchError`] if `pipe` embeds images differently from the weights the index recorded."""
    config = pipe.gill.config
    if index_fingerprint.get("retrieval_dim") != config.retrieval_dim:
        raise IndexWeightsMismatchError(
            f"The retrieval index {where} holds {index_fingerprint.get('retrieval_dim')}-wide embeddings, but this "
            f"pipeline's retrieval space is {config.retrieval_dim} wide (`gill.config.retrieval_dim`). Rebuild the "
            "index with this pipeline: `build_retrieval_index(pipe, source, output_dir)`."
        )
    mine = weights_fingerprint(pipe)
    probes = probe_embeddings(pipe)
    differences = {
        PROJECTION_PROBE: f"other learned weights: its `gill.ret_image_proj` has SHA-256 "
        f"{index_fingerprint.get('ret_image_proj_sha256')}, this pipeline's has {mine['ret_image_proj_sha256']}",
        ENCODER_PROBE: f"another vision encoder ({index_fingerprint.get('image_encoder')}) than this pipeline's "
        f"({mine['image_encoder']}): the same images get other embeddings",
    }
    for probe, difference in differences.items():
        # The projection probe is always recorded; the encoder probe only where the builder had an image encoder.
        if probe == ENCODER_PROBE and (probe not in index_probes or probe not in probes):
            continue
        cosine = _min_cosine(index_probes.get(probe, torch.empty(0)), probes[probe])
        if cosine < PROBE_MIN_COSINE:
            raise IndexWeightsMismatchError(
                f"The retrieval index {where} was built with {difference} (probe cosine similarity {cosine:.3f} < "
                f"{PROBE_MIN_COSINE}); its embeddings do not live in this pipeline's retrieval space. Rebuild the "
                "index with this pipeline: `build_retrieval_index(pipe, source, output_dir)`."
            )

"""Text-to-image generation scored by FID and CLIP score (GILL paper: CC3M FID close to that of its decoder alone).

Each image's first caption is given to GILL (with `[IMG0]` forced after it, generation only) and to the decoder
alone. Generated images are saved per example (the run resumes from them); at the end FID against the dataset's own
images (resized to the generated size) and CLIP score against the captions are computed by torchmetrics, with the
feature networks passed in.
"""

import os

from .clip_features import CLIPTextImageScorer
from .datasets import Loaded, read_captions
from .metrics import clip_score, frechet_distance
from .records import RecordLog, check_settings, ignored_notes, write_summary
from .runner import dataset_or_read, limit_examples, load_rgb, run_batches, save_image, to_tensor
from .systems import GILLSystem, make_baseline


PROTOCOL = "text_to_image"


def _batches(paths: list[str], size, batch_size: int, max_pixels: int | None):
    for start in range(0, len(paths), batch_size):
        yield to_tensor([load_rgb(p, max_pixels) for p in paths[start : start + batch_size]], size)


def evaluate_text_to_image(
    pipe,
    captions_file: str,
    image_dir: str,
    output_dir: str,
    *,
    data_format: str = "cc3m",
    fid_features=None,
    clip_scorer=None,
    baseline_text_encoder=None,
    image_pattern: str = "{id}",
    limit: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = True,
    dataset: Loaded | None = None,
    max_image_pixels: int | None = None,
) -> dict:
    r"""
    Generates one image per caption with GILL (and the decoder baseline) and scores them.

    Args:
        pipe ([`GILLPipeline`]): the GILL pipeline under test.
        captions_file (`str`): a CC3M-style TSV or a COCO captions JSON (`data_format`); `image_dir` its images.
        fid_features (`torch.nn.Module`, *optional*): the FID feature network: images `(N, 3, H, W)` in [0, 1] ->
            `(N, F)` (e.g. [`ImageEmbedder`], or torchmetrics' InceptionV3 built from a local weights file).
        clip_scorer (`str` or [`CLIPTextImageScorer`], *optional*): a whole CLIP, for CLIP score.
        baseline_text_encoder (`str` or `(text_encoder, tokenizer)`, *optional*): gives the decoder baseline.
        limit (`int`, *optional*): the first `limit` images only (a larger limit later resumes the run).
        dataset ([`Loaded`], *optional*): what `read_captions(captions_file, image_dir, data_format, image_pattern)`
            returned, when read already (`gill evaluate` reads and checks it before loading any model).
        max_image_pixels (`int`, *optional*): largest image read (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`).
    """
    loaded = dataset_or_read(dataset, read_captions, captions_file, image_dir, data_format, image_pattern)
    examples = limit_examples(loaded.examples, limit)
    settings = dict(
        protocol=PROTOCOL, captions_file=os.path.abspath(captions_file), data_format=data_format, seed=seed,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, baseline=baseline_text_encoder is not None,
    )
    check_settings(output_dir, settings)
    if isinstance(clip_scorer, (str, os.PathLike)):
        clip_scorer = CLIPTextImageScorer.from_pretrained(str(clip_scorer))
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    systems = [GILLSystem(pipe, **sampling)]
    baseline = make_baseline(pipe, baseline_text_encoder, sampling)
    if baseline is not None:
        systems.append(baseline)
    log = RecordLog(output_dir, fields=("caption", "image"))

    for system in systems:
        def work(batch, seeds, system=system):
            prompts = [e.captions[0] for e in batch]
            inputs = [[p] for p in prompts] if isinstance(system, GILLSystem) else prompts
            images = system.generate(inputs, seeds)
            return [
                {"id": e.id, "caption": p, "image": save_image(log, system.name, e.id, image)}
                for e, p, image in zip(batch, prompts, images)
            ]

        run_batches(log, examples, system.name, work, batch_size, seed, progress, desc=PROTOCOL)

    wanted = {e.id: e for e in examples}
    results = {}
    for system in systems:
        records = [r for r in log.of(system.name) if r["id"] in wanted]
        generated = [log.saved_image(r) for r in records]
        results[system.name] = {}
        if fid_features is not None and len(records) >= 2:
            size = load_rgb(generated[0], max_image_pixels).size
            real = [wanted[r["id"]].image_path for r in records]
            results[system.name]["fid"] = frechet_distance(
                fid_features, list(_batches(real, size, batch_size, max_image_pixels)),
                list(_batches(generated, size, batch_size, max_image_pixels)),
            )
        if clip_scorer is not None and records:
            # On the CLIP's device: torchmetrics moves the model to where the images are.
            images = [t.to(clip_scorer.images.device) for batch in _batches(generated, None, batch_size, max_image_pixels) for t in batch]
            results[system.name]["clip_score"] = clip_score(
                clip_scorer.as_torchmetrics(), images, [r["caption"] for r in records], batch_size
            )
        results[system.name]["n"] = len(records)
    notes = [
        "One image per dataset image, from its first caption. fid: lower is better, against the dataset's images "
        "resized to the generated size; clip_score: 100 x cosine(image, caption), higher is better.",
        f"Images left out: {loaded.skipped} missing.",
    ] + ignored_notes(log)
    if fid_features is not None and any(len(log.of(s.name)) < 2 for s in systems):
        notes.append("FID needs at least two images per system.")
    if baseline is not None:
        notes.append("sd: the decoder alone, given the same caption.")
    return write_summary(output_dir, PROTOCOL, results, settings, notes)

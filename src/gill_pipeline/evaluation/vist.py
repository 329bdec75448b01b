"""Contextual image generation on VIST (GILL paper, section 4.1 and table 1).

Each story gives its captions and images in order; the model reads the last `num_captions` captions, with the images
of all but the last step between them, and makes the image of the last step. It is compared with the true image by
the CLIP similarity of their image embeddings (paper: GILL 0.641 with 5 captions and 4 images) and by LPIPS. The
baseline is the decoder alone given the same captions as one text (it cannot see images).

Two LPIPS are recorded under two keys, never one: `lpips`, the published metric (ImageNet VGG/AlexNet/SqueezeNet
features with its learned channel weights, the paper's number), and `lpips_clip_features`, the same formula over a
CLIP vision tower's layers with unit weights (offline; it ranks systems but is not comparable with published LPIPS).
"""

import functools
import os
import warnings

from .datasets import DataFileError, Loaded, read_vist_stories
from .lpips import LPIPS, VisionTransformerFeatures
from .metrics import cosine_similarity
from .records import RecordLog, check_settings, ignored_notes, write_summary
from .runner import dataset_or_read, limit_examples, load_rgb, mean, run_batches, save_image, to_tensor
from .systems import GILLSystem, make_baseline


PROTOCOL = "vist"
LPIPS_KEY = "lpips"  # the published LPIPS only
CLIP_LPIPS_KEY = "lpips_clip_features"  # the LPIPS formula over CLIP layers: not comparable with published LPIPS


def _check_num_captions(num_captions) -> None:
    if not isinstance(num_captions, int) or isinstance(num_captions, bool) or num_captions < 1:
        raise ValueError(f"`num_captions` must be a positive integer, got {num_captions!r}.")


def select_stories(loaded: Loaded, num_captions: int, limit: int | None = None, path: str = "") -> tuple[list, int]:
    """(the first `limit` stories with at least `num_captions` steps, how many stories are shorter); refuses a file
    whose stories are all shorter (before any model runs)."""
    _check_num_captions(num_captions)
    long_enough = [s for s in loaded.examples if len(s.captions) >= num_captions]
    if not long_enough:
        longest = max(len(s.captions) for s in loaded.examples)
        raise DataFileError(path, f"no story has {num_captions} steps (the longest has {longest}); lower --num-captions.")
    return limit_examples(long_enough, limit), len(loaded.examples) - len(long_enough)


def story_inputs(story, num_captions: int, include_images: bool, load=load_rgb) -> tuple[list, str]:
    """(GILL's interleaved input, the baseline's text) for a story; the target is the story's last image."""
    start = len(story.captions) - num_captions
    interleaved = []
    for step in range(start, len(story.captions)):
        interleaved.append(story.captions[step])
        if include_images and step < len(story.captions) - 1:
            interleaved.append(load(story.image_paths[step]))
    return interleaved, " ".join(story.captions[start:])


def evaluate_vist(
    pipe,
    stories_file: str,
    image_dir: str,
    output_dir: str,
    *,
    clip,
    lpips=None,
    lpips_clip_features=None,
    baseline_text_encoder=None,
    num_captions: int = 5,
    include_images: bool = True,
    image_pattern: str = "{id}.jpg",
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
    Runs the VIST protocol and writes `records.jsonl`, `summary.json`, `summary.md` and the images to `output_dir`.

    Args:
        pipe ([`GILLPipeline`]): the GILL pipeline under test.
        stories_file (`str`): a VIST story-in-sequence JSON file; `image_dir`: its images (`image_pattern`).
        clip ([`ImageEmbedder`] or `Callable`): images -> embeddings, for the CLIP similarity to the true image.
        lpips (`Callable`, *optional*): the published LPIPS, `(images_a, images_b) -> (N,)` distances (e.g.
            `torchmetrics_lpips("vgg")`); recorded as `lpips`. The true image is resized to the generated image's size.
        lpips_clip_features ([`LPIPS`] or `Callable`, *optional*): the LPIPS formula over a CLIP's layers,
            `LPIPS(VisionTransformerFeatures.from_pretrained(...))`; recorded as `lpips_clip_features`. Passed as
            `lpips` (the old way), it is still recorded under its own key, with a `FutureWarning`.
        baseline_text_encoder (`str` or `(text_encoder, tokenizer)`, *optional*): gives the decoder baseline (see
            [`DecoderBaseline`]); without it only GILL is run.
        num_captions (`int`, defaults to 5), include_images (`bool`, defaults to `True`): the context (paper: 5
            captions and 4 images; 1 caption).
        limit (`int`, *optional*): evaluate the first `limit` stories only (a larger limit later resumes the run).
        dataset ([`Loaded`], *optional*): the stories `read_vist_stories(stories_file, image_dir, image_pattern)`
            returned, when read already (`gill evaluate` reads and checks them before loading any model).
        max_image_pixels (`int`, *optional*): largest image read (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`).

    Returns:
        `dict`: the summary (per system: mean CLIP similarity, mean of each LPIPS given, number of stories).
    """
    _check_num_captions(num_captions)  # the arguments before the file
    if _is_clip_feature_lpips(lpips):
        if lpips_clip_features is not None:
            raise ValueError(
                "`lpips` is an LPIPS over CLIP features and `lpips_clip_features` is given too: pass the published "
                "LPIPS (e.g. `torchmetrics_lpips('vgg')`) as `lpips`."
            )
        warnings.warn(
            "`lpips` is for the published LPIPS; an LPIPS over CLIP features belongs in `lpips_clip_features`. Its "
            f"values are recorded under `{CLIP_LPIPS_KEY}`.",
            FutureWarning,
            stacklevel=2,
        )
        lpips, lpips_clip_features = None, lpips
    distances = {key: f for key, f in ((LPIPS_KEY, lpips), (CLIP_LPIPS_KEY, lpips_clip_features)) if f is not None}
    settings = dict(
        protocol=PROTOCOL, stories_file=os.path.abspath(stories_file), num_captions=num_captions,
        include_images=include_images, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        baseline=baseline_text_encoder is not None, lpips=lpips is not None,
        lpips_clip_features=lpips_clip_features is not None,
    )
    loaded = dataset_or_read(dataset, read_vist_stories, stories_file, image_dir, image_pattern)
    stories, short = select_stories(loaded, num_captions, limit, stories_file)
    load = functools.partial(load_rgb, max_pixels=max_image_pixels)
    check_settings(output_dir, settings, read_old=_settings_before_two_keys)
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    gill = GILLSystem(pipe, **sampling)
    baseline = make_baseline(pipe, baseline_text_encoder, sampling)
    log = RecordLog(
        output_dir, fields=("clip_similarity", "image", *distances),
        upgrade=functools.partial(_rename_old_record, settings),
    )

    def scored(system, batch, images) -> list[dict]:
        truth = [load(s.image_paths[-1]) for s in batch]
        similarity = cosine_similarity(clip(images), clip(truth))
        records = []
        for i, story in enumerate(batch):
            record = {"id": story.id, "clip_similarity": float(similarity[i]), "image": save_image(log, system, story.id, images[i])}
            for key, distance in distances.items():
                record[key] = float(distance(to_tensor([images[i]]), to_tensor([truth[i]], images[i].size))[0])
            records.append(record)
        return records

    def run_gill(batch, seeds):
        return scored(gill.name, batch, gill.generate([story_inputs(s, num_captions, include_images, load)[0] for s in batch], seeds))

    def run_baseline(batch, seeds):
        return scored(baseline.name, batch, baseline.generate([story_inputs(s, num_captions, False)[1] for s in batch], seeds))

    run_batches(log, stories, gill.name, run_gill, batch_size, seed, progress, desc=PROTOCOL)
    if baseline is not None:
        run_batches(log, stories, baseline.name, run_baseline, batch_size, seed, progress, desc=PROTOCOL)

    wanted = {s.id for s in stories}
    results = {}
    for system in [gill.name] + ([baseline.name] if baseline is not None else []):
        records = [r for r in log.of(system) if r["id"] in wanted]
        results[system] = {"clip_similarity": mean([r["clip_similarity"] for r in records])}
        for key in distances:
            results[system][key] = mean([r[key] for r in records])
        results[system]["n"] = len(records)
    context = f"{num_captions} captions" + (f" and {num_captions - 1} images" if include_images and num_captions > 1 else "")
    notes = [
        f"Context: the last {context} of each story; target: the story's last image.",
        "clip_similarity: cosine similarity of the CLIP image embeddings of the generated and the true image "
        "(higher is better).",
        f"Stories left out: {loaded.skipped} with a missing image, {short} with fewer than {num_captions} steps.",
    ] + ignored_notes(log)
    if lpips is not None:
        notes.append(f"{LPIPS_KEY}: the published LPIPS (lower is better).")
    if lpips_clip_features is not None:
        notes.append(
            f"{CLIP_LPIPS_KEY}: the LPIPS formula over the CLIP vision tower's layers, unit channel weights (lower is "
            "better); not comparable with published LPIPS."
        )
    if baseline is not None:
        notes.append("sd: the decoder alone, given the same captions joined as one text (it cannot see images).")
    return write_summary(output_dir, PROTOCOL, results, settings, notes)


def _is_clip_feature_lpips(distance) -> bool:
    return isinstance(distance, LPIPS) and isinstance(distance.feature_network, VisionTransformerFeatures)


def _settings_before_two_keys(before: dict, settings: dict) -> dict:
    """The settings of a run written before the two LPIPS had their own keys, as they read now. Its `lpips: true`
    meant whichever one LPIPS the run was given; a resumed run is given the same one (the same command), so it names
    which. A run given both now differs from it, and is refused."""
    if CLIP_LPIPS_KEY in before or before.get("protocol") != PROTOCOL:
        return before
    upgraded = dict(before, **{CLIP_LPIPS_KEY: False})
    if before.get(LPIPS_KEY) and settings[CLIP_LPIPS_KEY] and not settings[LPIPS_KEY]:
        upgraded.update({LPIPS_KEY: False, CLIP_LPIPS_KEY: True})
    return upgraded


def _rename_old_record(settings: dict, record: dict) -> dict:
    """A record written before the two keys, by a run that was given the CLIP-feature LPIPS, holds it as `lpips`: read
    it under its own key (in memory; the file is left as it was). Records of a run with both carry both keys."""
    if settings[CLIP_LPIPS_KEY] and LPIPS_KEY in record and CLIP_LPIPS_KEY not in record:
        record[CLIP_LPIPS_KEY] = record.pop(LPIPS_KEY)
    return record

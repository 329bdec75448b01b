"""Measures what GILL does in the shapes world, judged by the world's attribute classifier.

    python -m training.shapes.evaluate_world --base shapes_base [--pipeline DIR --index DIR]

Defaults to the bundled pipeline and index (what ships). Writes benchmarks/results/shapes_world.md and .json:
1. generation: exact-attribute accuracy of GILL's images vs the world's own SD pipeline given the same captions;
2. retrieval: caption -> image recall@1 (attribute match) over the index;
3. decision: accuracy of the decision head on ret/gen labels;
4. context: prompts whose answer depends on earlier text or an input image, GILL vs SD given the whole text;
5. captioning: attribute accuracy of the text GILL writes about an input image, and where its errors go;
6. the same on attribute combinations held out of every training stage;
7. context prompts worded with phrasings held out of every training stage (world.HELD_OUT_PHRASINGS);
8. "an input image + the same shape in another colour", in the world's and in held-out phrasings;
9. the README default demo (`gill generate`'s preset for this model) over every scene of the world: is the image it
   shows (the decision head's pick of retrieved vs generated) the input scene?
10. a chat's first turn (`[input image] <instruction> :`, the demo's settings): GILL's written answer and shown image;
and a table of issue 12's targets (section 2) against these figures.
"""

import argparse
import json
import logging
import os
import random
import time

import torch

# FORCE_IMAGE: an [IMG] group at once, so the image comes from what the LM read (as `gill evaluate` asks for it).
from gill_pipeline.evaluation.systems import FORCE_IMAGE

from .classifier import AttributeClassifier
from .models import SIZES
from .train_world_gill import RETRIEVABLE_SHAPES
from .world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES as SHAPE_SIZES,
    HELD_OUT_PHRASINGS,
    all_scenes,
    change_instruction,
    context_example,
    context_text,
    draw,
    held_out_scenes,
    training_scenes,
)

logger = logging.getLogger("shapes.eval")
RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "shapes_world")
SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)


def label_tensor(scenes) -> torch.Tensor:
    return torch.tensor([s.labels() for s in scenes])


def accuracy(pred: torch.Tensor, scenes) -> dict:
    labels = label_tensor(scenes)
    per = {name: float((pred[:, i] == labels[:, i]).float().mean()) for i, name in enumerate(("shape", "colour", "position", "size"))}
    return {"exact": float((pred == labels).all(-1).float().mean()), **per, "n": len(scenes)}


def judge(classifier, images: torch.Tensor) -> torch.Tensor:
    return classifier.predict(images.float().clamp(0, 1))


def batched(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def gill_images(pipe, inputs: list[list], seed: int, mode: str = "generate") -> list:
    """One forced [IMG] group per input; returns the GILLImage of each (None where no image came)."""
    out = []
    for chunk_index, chunk in enumerate(batched(inputs, 32)):
        generators = [torch.Generator().manual_seed(seed + chunk_index * 1000 + i) for i in range(len(chunk))]
        result = pipe(chunk, generator=generators, image_mode=mode, output_type="pt", **FORCE_IMAGE, **SAMPLING)
        out += [images[0] if images else None for images in result.gill_images]
    return out


def sd_images(sd, prompts: list[str], seed: int) -> torch.Tensor:
    out = []
    for chunk_index, chunk in enumerate(batched(prompts, 32)):
        generators = [torch.Generator().manual_seed(seed + chunk_index * 1000 + i) for i in range(len(chunk))]
        out.append(sd(chunk, generator=generators, output_type="pt", **SAMPLING).images)
    return torch.cat(out)


def generation(pipe, sd, classifier, scenes, seed) -> dict:
    captions = [s.caption() for s in scenes]
    made = gill_images(pipe, [[c] for c in captions], seed)
    missing = sum(m is None for m in made)
    images = torch.stack([m.image if m is not None else torch.zeros(3, SIZES.image_size, SIZES.image_size) for m in made])
    return {
        "gill": accuracy(judge(classifier, images), scenes) | {"no_image": missing},
        "sd": accuracy(judge(classifier, sd_images(sd, captions, seed)), scenes),
    }


def decoder_round_trip(sd, classifier, scenes, seed) -> dict:
    """Drawn images through the SD pipeline's VAE and back, judged: the ceiling the decoder sets on any image drawn
    through it (GILL's and SD's alike), whatever conditions the UNet."""
    from .pretrain_base import image_tensor, world_images

    vae = sd.vae
    with torch.no_grad():
        latents = vae.encode(image_tensor(world_images(scenes, seed)).to(vae.dtype)).latent_dist.mode()
        decoded = (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
    return accuracy(judge(classifier, decoded), scenes)


def retrieval(pipe, scenes, seed) -> dict:
    hits, found = 0, gill_images(pipe, [[s.caption()] for s in scenes], seed, mode="retrieve")
    for scene, image in zip(scenes, found):
        hits += image is not None and image.metadata.get("caption") == scene.caption()
    return {"recall@1": hits / len(scenes), "n": len(scenes)}


def decision(pipe, scenes) -> dict:
    # The decision head read at a forced [IMG0], scored as `gill evaluate decision` scores the PartiPrompts labels.
    from gill_pipeline.evaluation import GILLSystem, decision_report

    system = GILLSystem(pipe)
    probs = torch.cat([system.decision_probs(chunk) for chunk in batched([[s.caption()] for s in scenes], 64)])
    predicted = ["ret" if p > 0.5 else "gen" for p in probs[:, 1].tolist()]
    truth = ["ret" if s.shape in RETRIEVABLE_SHAPES else "gen" for s in scenes]
    report = decision_report(predicted, truth)
    return {"accuracy": report["accuracy"], "n": report["n"]}


def gill_writes(pipe, inputs: list[list], max_new_tokens: int = 12) -> list[str]:
    texts = []
    for chunk in batched(inputs, 64):
        texts += pipe(chunk, max_new_tokens=max_new_tokens, max_images=0).texts
    return texts


def parse_scene(text: str) -> tuple[int, int, int, int]:
    """Attributes named in a text (the first mention of each); -1 where none is named."""
    words = text.replace(".", " ").split()

    def first(options):
        for w in words:
            if w in options:
                return list(options).index(w)
        return -1

    return first(SHAPES), first(COLOURS), first(POSITIONS), first(SHAPE_SIZES)


def context(pipe, sd, classifier, examples, seed) -> dict:
    texts = [context_text(first, instruction) for first, instruction, _ in examples]
    targets = [target for _, _, target in examples]
    # a. GILL draws at once after reading the context
    made = gill_images(pipe, [[t] for t in texts], seed)
    gill_now = torch.stack([m.image for m in made])
    # b. GILL first writes its answer, then draws
    written = [w.split(".")[0] for w in gill_writes(pipe, [[t] for t in texts])]
    made_after = gill_images(pipe, [[t + " " + w] for t, w in zip(texts, written)], seed)
    gill_after = torch.stack([m.image for m in made_after])
    # c. the context given as an image instead of text
    rng = random.Random(seed)
    image_inputs = [
        ["there is", draw(first, SIZES.image_size, 1, rng.randrange(1 << 30)), f". {instruction} :"]
        for first, instruction, _ in examples
    ]
    gill_image_context = torch.stack([m.image for m in gill_images(pipe, image_inputs, seed)])
    return {
        "gill_image_at_once": accuracy(judge(classifier, gill_now), targets),
        "gill_writes_then_draws": accuracy(judge(classifier, gill_after), targets),
        "gill_written_answer_text": accuracy(torch.tensor([parse_scene(w) for w in written]), targets),
        "gill_image_context": accuracy(judge(classifier, gill_image_context), targets),
        "sd_whole_text": accuracy(judge(classifier, sd_images(sd, texts, seed)), targets),
        "example": {"prompt": texts[0], "gill_wrote": written[0], "target": targets[0].caption()},
    }


def error_directions(pred: torch.Tensor, scenes) -> dict:
    """For shape and position: how often each `true->written` confusion happened. One-directional bias shows as
    errors that all go one way (left->right but never right->left)."""
    out = {}
    for column, attribute, names in ((0, "shape", SHAPES), (2, "position", list(POSITIONS))):
        counts = {}
        for p, scene in zip(pred[:, column].tolist(), scenes):
            truth = getattr(scene, attribute)
            written = names[p] if p >= 0 else "none"
            if written != truth:
                counts[f"{truth}->{written}"] = counts.get(f"{truth}->{written}", 0) + 1
        out[attribute] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def one_directional(directions: dict) -> bool:
    """True when some confusion a->b happened at least 3 times and never b->a."""
    for counts in directions.values():
        for pair, n in counts.items():
            a, b = pair.split("->")
            if n >= 3 and counts.get(f"{b}->{a}", 0) == 0:
                return True
    return False


def captioning(pipe, scenes, seed) -> dict:
    rng = random.Random(seed)
    # BOS follows the image, as in the captioning training sequences ([prefix][BOS caption]).
    inputs = [[draw(s, SIZES.image_size, 1, rng.randrange(1 << 30)), ""] for s in scenes]
    texts = gill_writes(pipe, inputs)
    pred = torch.tensor([parse_scene(t) for t in texts])
    directions = error_directions(pred, scenes)
    return accuracy(pred, scenes) | {
        "example": texts[0], "errors": directions, "one_directional": one_directional(directions),
    }


def colour_change(pipe, sd, classifier, pairs, phrasing: str, seed) -> dict:
    """'there is [input image] . <same shape in another colour> :' -> GILL's image; the same with the input as text;
    SD given the whole text. `pairs`: (input scene, target scene) differing in colour only; `phrasing` is "world"
    (the world's wording) or "held_out" (the held-out wordings in turn)."""
    rng = random.Random(seed)
    templates = (None,) if phrasing == "world" else HELD_OUT_PHRASINGS["colour"]
    examples = [
        (first, change_instruction("colour", target.colour, templates[i % len(templates)]), target)
        for i, (first, target) in enumerate(pairs)
    ]
    texts = [context_text(first, instruction) for first, instruction, _ in examples]
    targets = [target for _, _, target in examples]
    image_inputs = [
        ["there is", draw(first, SIZES.image_size, 1, rng.randrange(1 << 30)), f". {instruction} :"]
        for first, instruction, _ in examples
    ]
    return {
        "gill_image_context": accuracy(judge(classifier, torch.stack([m.image for m in gill_images(pipe, image_inputs, seed)])), targets),
        "gill_text_context": accuracy(judge(classifier, torch.stack([m.image for m in gill_images(pipe, [[t] for t in texts], seed)])), targets),
        "sd_whole_text": accuracy(judge(classifier, sd_images(sd, texts, seed)), targets),
        "example": texts[0],
    }


def demo_settings() -> dict:
    """The README default demo's call arguments: `gill generate`'s preset for this model."""
    from gill_pipeline.bundled.presets import PRESETS, SHAPES_MODEL
    from gill_pipeline.demo.settings import CALL_ARGUMENTS

    return {CALL_ARGUMENTS[k]: v for k, v in PRESETS[SHAPES_MODEL]["settings"].items()}


def demo_answers(pipe, inputs: list[list], seed: int) -> tuple[list, list, list]:
    """Each input answered with the README demo's settings -> (the image shown, a blank where none came), its source
    ("none" where none came) and the text, per input."""
    settings = demo_settings()
    shown, sources, texts = [], [], []
    for chunk_index, chunk in enumerate(batched(inputs, 32)):
        generators = [torch.Generator().manual_seed(seed + chunk_index * 1000 + i) for i in range(len(chunk))]
        result = pipe(chunk, generator=generators, output_type="pt", **settings)
        for images, text in zip(result.gill_images, result.texts):
            shown.append(images[0].image if images else torch.zeros(3, SIZES.image_size, SIZES.image_size))
            sources.append(images[0].source if images else "none")
            texts.append(text)
    return shown, sources, texts


def readme_demo(pipe, classifier, scenes, seed) -> dict:
    """Every scene's image in, the demo's settings: the shown image (GILL's pick) must show the input scene."""
    settings = demo_settings()
    rng = random.Random(seed)
    inputs = [[draw(s, SIZES.image_size, 1, rng.randrange(1 << 30))] for s in scenes]
    shown, sources, texts = demo_answers(pipe, inputs, seed)
    pred = judge(classifier, torch.stack(shown))
    # No image shown is wrong, whatever the classifier reads into a blank.
    right = [bool(ok) and source != "none" for ok, source in zip((pred == label_tensor(scenes)).all(-1).tolist(), sources)]
    by_source = {}
    for source, ok in zip(sources, right):
        total, good = by_source.get(source, (0, 0))
        by_source[source] = (total + 1, good + int(ok))
    described = torch.tensor([parse_scene(t) for t in texts])
    return {
        "right": sum(right) / len(scenes),
        "n": len(scenes),
        "by_source": {k: {"n": n, "right": good} for k, (n, good) in sorted(by_source.items())},
        "description_exact": float((described == label_tensor(scenes)).all(-1).float().mean()),
        "settings": settings,
        "min_similarity": getattr(pipe.retrieval_index, "min_similarity", None),
    }


def chat_turn(pipe, classifier, examples, seed) -> dict:
    """A chat's first turn, `[input image] <instruction> :` (what `gill chat` and the demo page send), with the README
    demo's settings: is GILL's written answer the target scene, and is the image it shows?"""
    rng = random.Random(seed)
    inputs = [[draw(first, SIZES.image_size, 1, rng.randrange(1 << 30)), f"{instruction} :"] for first, instruction, _ in examples]
    targets = [target for _, _, target in examples]
    shown, sources, texts = demo_answers(pipe, inputs, seed)
    pred = judge(classifier, torch.stack(shown))
    image_right = (pred == label_tensor(targets)).all(-1) & torch.tensor([source != "none" for source in sources])
    return {
        "text": accuracy(torch.tensor([parse_scene(t) for t in texts]), targets),
        "image_exact": float(image_right.float().mean()),
        "no_image": sources.count("none"),
        "n": len(examples),
        "example": {"request": inputs[0][1], "gill_wrote": texts[0], "target": targets[0].caption()},
    }


# Issue 12, section 2: image targets after a context (exact attributes), demo, captioning.
TARGETS = dict(context_exact=0.85, demo_right=0.95, captioning_exact=0.9)


def targets(report: dict) -> list[dict]:
    """Each measured target: what, figure(s), threshold, met. Both splits must meet the image and captioning ones."""
    rows = []
    for split in ("in_distribution", "held_out"):
        r = report[split]
        for name, value in (
            ("context chain as text, world phrasing: GILL draws at once", r["context"]["gill_image_at_once"]),
            ("context chain as text, new phrasings: GILL draws at once", r["context_new_phrasings"]["gill_image_at_once"]),
            ("input image + change, world phrasing", r["context"]["gill_image_context"]),
            ("input image + change, new phrasings", r["context_new_phrasings"]["gill_image_context"]),
            ("input image + same shape in another colour, world phrasing", r["colour_change_world"]["gill_image_context"]),
            ("input image + same shape in another colour, new phrasings", r["colour_change_new_phrasings"]["gill_image_context"]),
        ):
            rows.append(dict(what=f"{split}: {name}", value=value["exact"], target=TARGETS["context_exact"]))
        rows.append(dict(what=f"{split}: captioning exact", value=r["captioning"]["exact"], target=TARGETS["captioning_exact"]))
        rows.append(dict(what=f"{split}: captioning errors not one-directional", value=float(not r["captioning"]["one_directional"]), target=1.0))
    rows.append(dict(what="README demo: shown image is the input scene", value=report["readme_demo"]["right"], target=TARGETS["demo_right"]))
    for row in rows:
        row["met"] = row["value"] >= row["target"]
    return rows


def markdown(report: dict) -> str:
    def row(name, r):
        return f"| {name} | {r['exact']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} | {r['position']:.3f} | {r['size']:.3f} | {r['n']} |"

    header = ["| what | exact | shape | colour | position | size | n |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines = ["# GILL in the shapes world", "", report["setup"], ""]
    for split in ("in_distribution", "held_out"):
        r = report[split]
        lines += [f"## {split.replace('_', ' ')}", "", *header]
        lines.append(row("1. generation: GILL", r["generation"]["gill"]))
        lines.append(row("1. generation: SD (same captions)", r["generation"]["sd"]))
        if "decoder_round_trip" in r:
            lines.append(row("1. drawn images through the VAE and back (the decoder's ceiling)", r["decoder_round_trip"]))
        for key, name in (
            ("gill_image_at_once", "4. context (text): GILL draws at once"),
            ("gill_writes_then_draws", "4. context (text): GILL writes, then draws"),
            ("gill_written_answer_text", "4. context (text): GILL's written answer (text)"),
            ("gill_image_context", "4. context (input image): GILL draws at once"),
            ("sd_whole_text", "4. context (text): SD given the whole text"),
        ):
            lines.append(row(name, r["context"][key]))
        lines.append(row("5. captioning: GILL's text about an input image", r["captioning"]))
        lines += [""]
        if "retrieval" in r:
            lines.append(f"2. retrieval recall@1 (attribute match, {r['retrieval']['n']} captions): **{r['retrieval']['recall@1']:.3f}**")
        lines.append(f"3. decision accuracy ({r['decision']['n']} prompts): **{r['decision']['accuracy']:.3f}**")
        lines += ["", "New phrasings (held out of every training stage) and colour changes of an input image:", "",
                  *header]
        for key, name in (
            ("gill_image_at_once", "7. context (text), new phrasings: GILL draws at once"),
            ("gill_writes_then_draws", "7. context (text), new phrasings: GILL writes, then draws"),
            ("gill_written_answer_text", "7. context (text), new phrasings: GILL's written answer (text)"),
            ("gill_image_context", "7. context (input image), new phrasings: GILL draws at once"),
            ("sd_whole_text", "7. context (text), new phrasings: SD given the whole text"),
        ):
            lines.append(row(name, r["context_new_phrasings"][key]))
        for key, phrasing in (("colour_change_world", "world phrasing"), ("colour_change_new_phrasings", "new phrasings")):
            lines.append(row(f"8. input image + other colour, {phrasing}: GILL", r[key]["gill_image_context"]))
            lines.append(row(f"8. same as text, {phrasing}: GILL", r[key]["gill_text_context"]))
            lines.append(row(f"8. same as text, {phrasing}: SD given the whole text", r[key]["sd_whole_text"]))
        lines += ["", f"Captioning errors (true->written): shape {r['captioning']['errors']['shape']}, position "
                  f"{r['captioning']['errors']['position']}; one-directional: {r['captioning']['one_directional']}."]
        ex = r["context"]["example"]
        lines += ["", f"Context example: `{ex['prompt']}` -> GILL wrote `{ex['gill_wrote']}` (target: `{ex['target']}`).",
                  f"Captioning example: `{r['captioning']['example']}`", ""]
    demo = report["readme_demo"]
    lines += ["## README default demo", "",
              f"9. Every scene of the world as the input image, with `gill generate`'s settings for this model "
              f"({demo['settings']}; the retrieval set's similarity floor: {demo.get('min_similarity')}): the shown image is "
              f"the input scene for **{demo['right']:.3f}** of {demo['n']} "
              f"scenes (by the image shown: {demo['by_source']}); GILL's description is exact for "
              f"{demo['description_exact']:.3f}.", ""]
    if "chat_turn" in report:
        chat = report["chat_turn"]
        lines += ["## A chat's first turn", "",
                  f"10. `[input image] <instruction> :` (what `gill chat` and the demo page send; seen combinations, the "
                  f"world's phrasing) with the same settings: GILL's written answer is exact for **{chat['text']['exact']:.3f}** "
                  f"of {chat['n']}, the image it shows for **{chat['image_exact']:.3f}** ({chat['no_image']} without an image). "
                  f"Example: `{chat['example']['request']}` -> `{chat['example']['gill_wrote']}` (target: "
                  f"`{chat['example']['target']}`).", ""]
    lines += ["## Issue 12 targets (section 2)", "",
              "| target | measured | needed | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['what']} | {t['value']:.3f} | {t['target']:.2f} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    return "\n".join(lines + [""])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="folder of training.shapes.pretrain_base (SD and classifier)")
    parser.add_argument("--pipeline", default=None, help="GILL pipeline folder (default: the bundled one)")
    parser.add_argument("--index", default=None, help="retrieval index folder (default: the bundled one)")
    parser.add_argument("--out", default=RESULTS, help="results path without extension")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the evaluation sets (tests: small)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()

    from diffusers import StableDiffusionPipeline

    from gill_pipeline import GILLPipeline
    from gill_pipeline.bundled import BUNDLED_INDEX, load_bundled_pipeline

    if args.pipeline is None:
        pipe = load_bundled_pipeline(with_index=False)
        index = args.index or BUNDLED_INDEX
    else:
        pipe, index = GILLPipeline.from_pretrained(args.pipeline, dtype=torch.float32), args.index
    if index:
        pipe.load_retrieval_index(index)
    pipe.set_progress_bar_config(disable=True)
    sd = StableDiffusionPipeline.from_pretrained(os.path.join(args.base, "sd"), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    classifier = AttributeClassifier.from_pretrained(os.path.join(args.base, "classifier")).eval()

    def take(items, fraction):
        return items[: max(2, int(len(items) * fraction))]

    rng = random.Random(args.seed)
    seen = take(training_scenes(), args.scale)
    held = held_out_scenes()
    held_gen = take([s for s in held for _ in range(4)], args.scale)  # 4 samples per held-out combination
    ctx_seen = take([context_example(rng) for _ in range(90)], args.scale)
    ctx_held = []
    while len(ctx_held) < max(2, int(45 * args.scale)):
        example = context_example(rng, include_held_out=True)
        if example[2].held_out:
            ctx_held.append(example)

    phrased_seen, phrased_held = [], []
    while len(phrased_seen) < max(2, int(90 * args.scale)):
        phrased_seen.append(context_example(rng, phrasings="held_out"))
    while len(phrased_held) < max(2, int(45 * args.scale)):
        example = context_example(rng, include_held_out=True, phrasings="held_out")
        if example[2].held_out:
            phrased_held.append(example)
    # "same shape in another colour": (input scene, target scene) pairs; held-out targets for the held-out split
    colour_seen, colour_held = [], []
    for scene in take(training_scenes()[::2], args.scale):
        colour = rng.choice([c for c in COLOURS if c != scene.colour and not scene.replace(colour=c).held_out])
        colour_seen.append((scene, scene.replace(colour=colour)))
    for scene in held_gen:
        colour_held.append((scene.replace(colour=rng.choice([c for c in COLOURS if c != scene.colour])), scene))
    demo_scenes = take(all_scenes(), args.scale)

    report = {
        "setup": (
            f"Judge: the world's attribute classifier. Sampling: DDIM {SAMPLING['num_inference_steps']} steps, guidance "
            f"{SAMPLING['guidance_scale']}. GILL images are forced right after the prompt (`img_logit_scale=math.inf`, "
            "`max_new_tokens=1`) unless stated. In-distribution prompts use combinations seen in training (new image "
            "draws and seeds; the caption texts themselves were seen); held-out combinations were excluded from every "
            "training stage (base models, GILL, index, decision head)."
        ),
        "in_distribution": {
            "generation": generation(pipe, sd, classifier, seen, args.seed),
            "decoder_round_trip": decoder_round_trip(sd, classifier, seen, args.seed),
            "retrieval": retrieval(pipe, [s for s in seen if s.shape in RETRIEVABLE_SHAPES], args.seed),
            "decision": decision(pipe, seen),
            "context": context(pipe, sd, classifier, ctx_seen, args.seed),
            "captioning": captioning(pipe, seen, args.seed),
            "context_new_phrasings": context(pipe, sd, classifier, phrased_seen, args.seed + 2),
            "colour_change_world": colour_change(pipe, sd, classifier, colour_seen, "world", args.seed + 4),
            "colour_change_new_phrasings": colour_change(pipe, sd, classifier, colour_seen, "held_out", args.seed + 5),
        },
        "readme_demo": readme_demo(pipe, classifier, demo_scenes, args.seed + 6),
        "chat_turn": chat_turn(pipe, classifier, ctx_seen, args.seed + 9),
        "held_out": {
            "generation": generation(pipe, sd, classifier, held_gen, args.seed + 1),
            "decoder_round_trip": decoder_round_trip(sd, classifier, held_gen, args.seed + 1),
            "decision": decision(pipe, held),
            "context": context(pipe, sd, classifier, ctx_held, args.seed + 1),
            "captioning": captioning(pipe, held_gen, args.seed + 1),
            "context_new_phrasings": context(pipe, sd, classifier, phrased_held, args.seed + 3),
            "colour_change_world": colour_change(pipe, sd, classifier, colour_held, "world", args.seed + 7),
            "colour_change_new_phrasings": colour_change(pipe, sd, classifier, colour_held, "held_out", args.seed + 8),
        },
    }
    report["targets"] = targets(report)
    report["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report) + f"\nEvaluation took {report['seconds']} s. Command: `python -m training.shapes.evaluate_world --base BASE`.\n")
    logger.info("wrote %s.md", args.out)
    return report


if __name__ == "__main__":
    main()

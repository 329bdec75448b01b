"""Shapes-world evaluation data written in the original datasets' formats, for `gill evaluate` (docs/evaluation.md).

The writers (`write_vist`, `write_visdial`, `write_cc3m`, `write_coco`, `write_decisions`) draw world scenes into a
folder and write the file each dataset ships (VIST story-in-sequence JSON, VisDial v1.0 JSON, CC3M TSV, COCO captions
JSON, PartiPrompts decision TSV). `tests/test_evaluation.py` reads them back and `benchmarks/bench_shapes_protocols.py`
runs every protocol on them.

What makes a protocol measure something in this world:
- `context_stories`: VIST-style stories made of the world's context chains. Step 1 is "there is <scene>" with its
  image, step 2 the change ". now the same shape in blue :" with the target's image. `vist --num-captions 2` gives
  GILL both captions and the first image and asks for the last image; the decoder alone reads the two captions as
  one text (the world's `context_text`), which names the change but leaves the answer to be worked out.
- `held_out=True` stories end on a combination held out of every training stage (`world.HELD_OUT`).
- `decision_scenes` / `write_decisions`: retrieve circles and squares (the retrieval set holds them), generate
  triangles, as `train_world_gill.write_decision_labels` labels the training data.
"""

import json
import os
import random

from .models import SIZES
from .train_world_gill import write_decision_tsv
from .world import Scene, context_example, context_text, draw

# A story step: a scene (its caption is the step's text) or a (text, scene) pair.
Step = Scene | tuple[str, Scene]

VIST_FILE = "val.story-in-sequence.json"
VISDIAL_FILE = "visdial_1.0_val.json"
CC3M_FILE = "cc3m_val.tsv"
COCO_FILE = "captions_val2017.json"
DECISIONS_FILE = "decisions.tsv"


def _step_text_and_scene(step: Step) -> tuple[str, Scene]:
    if isinstance(step, Scene):
        return step.caption(), step
    return step


def write_vist(folder, stories: list[list[Step]]) -> str:
    """A VIST story-in-sequence file: one annotation per step, shuffled (the reader orders them). Images are
    `{photo_flickr_id}.png` in `folder` (read with `--image-pattern "{id}.png"`, or the default `{id}.jpg`, whose
    other extensions are found too)."""
    os.makedirs(folder, exist_ok=True)
    annotations, photo = [], 1000
    for s, story in enumerate(stories):
        for order, step in enumerate(story):
            text, scene = _step_text_and_scene(step)
            draw(scene, SIZES.image_size, 1, photo).save(os.path.join(folder, f"{photo}.png"))
            annotations.append([{"story_id": str(50 + s), "photo_flickr_id": str(photo), "worker_arranged_photo_order": order,
                                 "text": text, "album_id": "1", "storylet_id": str(photo)}])
            photo += 1
    random.Random(0).shuffle(annotations)
    path = os.path.join(folder, VIST_FILE)
    with open(path, "w") as f:
        json.dump({"images": [], "albums": [], "annotations": annotations}, f)
    return path


def write_visdial(folder, scenes: list[Scene]) -> str:
    """A VisDial v1.0 file: the caption gives size and position, two rounds ask for the shape and the colour."""
    os.makedirs(folder, exist_ok=True)
    questions, answers, dialogs = ["what shape", "what colour"], [], []
    for i, scene in enumerate(scenes):
        draw(scene, SIZES.image_size, 1, i).save(os.path.join(folder, f"VisualDialog_val2018_{i + 1:012d}.jpg"), quality=95)
        answers += [scene.shape, scene.colour]
        caption = f"a {scene.size} shape {'in the center' if scene.position == 'center' else scene.caption().split(scene.shape)[1].strip()}"
        dialogs.append({"image_id": i + 1, "caption": caption, "dialog": [
            {"question": 0, "answer": 2 * i, "answer_options": [], "gt_index": 0},
            {"question": 1, "answer": 2 * i + 1, "answer_options": [], "gt_index": 0},
        ]})
    path = os.path.join(folder, VISDIAL_FILE)
    with open(path, "w") as f:
        json.dump({"version": "1.0", "split": "val2018", "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}, f)
    return path


def write_cc3m(folder, scenes: list[Scene]) -> str:
    """A CC3M-style TSV (`caption<TAB>image`, image names without an extension, as CC3M's)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CC3M_FILE)
    with open(path, "w") as f:
        f.write("caption\timage\n")
        for i, scene in enumerate(scenes):
            draw(scene, SIZES.image_size, 1, i).save(os.path.join(folder, f"{i}_{1000 + i}.png"))
            f.write(f"{scene.caption()}\t{i}_{1000 + i}\n")
    return path


def write_coco(folder, scenes: list[Scene]) -> str:
    """A COCO captions JSON with two captions per image."""
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        draw(scene, SIZES.image_size, 1, i).save(os.path.join(folder, f"{i:012d}.jpg"), quality=95)
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        annotations += [{"image_id": i, "id": 2 * i, "caption": scene.caption()},
                        {"image_id": i, "id": 2 * i + 1, "caption": scene.caption() + " ."}]
    path = os.path.join(folder, COCO_FILE)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return path


def write_decisions(folder, scenes: list[Scene]) -> str:
    """Shapes-world labels in the PartiPrompts decision format: retrieve circles and squares (the retrieval set holds
    them), generate triangles; one `same` row has no label."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, DECISIONS_FILE)
    write_decision_tsv(path, scenes, extra_rows=[(scenes[0].caption(), "same")])
    return path


def context_story(first: Scene, instruction: str, target: Scene) -> list[tuple[str, Scene]]:
    """A two-step story of one context chain: its captions joined are `world.context_text(first, instruction)`."""
    opening = f"there is {first.caption()}"
    change = context_text(first, instruction)[len(opening):].strip()
    return [(opening, first), (change, target)]


def context_stories(n: int, seed: int, held_out: bool = False) -> list[list[tuple[str, Scene]]]:
    """`n` two-step stories (see `context_story`), deterministic for `seed`. With `held_out`, every story ends on a
    combination held out of training (its first scene may be any); otherwise no scene in it is held out."""
    if n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    stories = []
    while len(stories) < n:
        first, instruction, target = context_example(rng, include_held_out=held_out)
        if held_out and not target.held_out:
            continue
        stories.append(context_story(first, instruction, target))
    return stories

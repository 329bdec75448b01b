"""The shapes world: a deterministic generator of small images of shapes and the text that describes them.

Every image shows one shape (`circle`, `square`, `triangle`) of one colour, at one position and of one size, on a
light-grey background, drawn at 4x and box-downsampled. Captions come from templates ("a small red circle on the
left"); contexts chain sentences whose answer depends on earlier text ("There is a red circle. Now the same shape in
blue:").

A fixed set of attribute combinations is HELD OUT of every training stage, to measure generalisation.

    python -m training.shapes.world --out world_preview.png   # a grid of examples
"""

import argparse
import dataclasses
import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
SIZES = {"small": 0.17, "large": 0.3}
BACKGROUND = (225, 225, 225)
ATTRIBUTES = ("shape", "colour", "position", "size")

# Held out of every training stage (3 of 180 combinations per shape): evaluated apart as "generalisation".
HELD_OUT = frozenset(
    {
        ("circle", "purple", "top", "large"),
        ("circle", "orange", "left", "small"),
        ("circle", "green", "bottom", "large"),
        ("square", "yellow", "right", "small"),
        ("square", "red", "center", "large"),
        ("square", "blue", "top", "small"),
        ("triangle", "green", "left", "large"),
        ("triangle", "purple", "bottom", "small"),
        ("triangle", "orange", "center", "small"),
    }
)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.position, self.size)

    @property
    def held_out(self) -> bool:
        return self.key in HELD_OUT

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        if self.position in ("top", "bottom"):
            where = f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    def labels(self) -> tuple[int, int, int, int]:
        return (
            SHAPES.index(self.shape),
            list(COLOURS).index(self.colour),
            list(POSITIONS).index(self.position),
            list(SIZES).index(self.size),
        )

    def replace(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


def all_scenes(include_held_out: bool = True) -> list[Scene]:
    scenes = [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES)]
    return [s for s in scenes if include_held_out or not s.held_out]


def training_scenes() -> list[Scene]:
    return all_scenes(include_held_out=False)


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if s.held_out]


def draw(scene: Scene, size: int = 32, jitter: int = 0, seed: int = 0) -> Image.Image:
    """Draws a scene at 4x and box-downsamples it to `size` x `size` RGB. `jitter` shifts the shape by up to that
    many output pixels (deterministic for a given `seed`)."""
    scale = 4
    big = size * scale
    image = Image.new("RGB", (big, big), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    rng = random.Random(seed)
    cx, cy = POSITIONS[scene.position]
    cx = cx * big + rng.randint(-jitter, jitter) * scale
    cy = cy * big + rng.randint(-jitter, jitter) * scale
    r = SIZES[scene.size] * big / 2 * 1.6
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        s = r * 0.88
        canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        canvas.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def sample_scenes(n: int, seed: int, include_held_out: bool = False) -> list[Scene]:
    pool = all_scenes(include_held_out=include_held_out)
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def images_and_captions(n: int, seed: int, size: int = 32, jitter: int = 1, include_held_out: bool = False):
    """`n` (PIL image, caption, scene) triples, deterministic for `seed`."""
    scenes = sample_scenes(n, seed, include_held_out)
    return [(draw(s, size, jitter, seed * 1_000_003 + i), s.caption(), s) for i, s in enumerate(scenes)]


# -------------------------------------------------------------------------------------------------------------------
# Contexts: text whose answer depends on earlier text or an earlier image
# -------------------------------------------------------------------------------------------------------------------
CHANGEABLE = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "position": list(POSITIONS),
    "size": list(SIZES),
}


# How each instruction is worded. The first phrasing of each attribute is the world's own (the only one the bundled
# model was trained on); the others in TRAINING_PHRASINGS are used by every training stage (the LM's corpus, GILL's
# documents) with `phrasings="training"`; HELD_OUT_PHRASINGS are used by none, to measure new wordings built from the
# same vocabulary. `{value}` is the new attribute value, `{where}` the position's words ("on the left").
TRAINING_PHRASINGS = {
    "colour": ("now the same shape in {value}", "now make it {value}"),
    "shape": ("now the same colour as a {value}", "now make it a {value}"),
    "position": ("now move it {where}", "now make it {where}"),
    "size": ("now make it {value}", "now make the shape {value}"),
}
HELD_OUT_PHRASINGS = {
    "colour": ("now it is {value}", "now the shape is {value}"),
    "shape": ("now it is a {value}", "now the shape is a {value}"),
    "position": ("now it is {where}", "now the shape is {where}"),
    "size": ("now it is {value}", "now the shape is {value}"),
}
PHRASING_SETS = ("world", "training", "held_out")


def where_words(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


def change_instruction(attribute: str, value: str, template: str | None = None) -> str:
    """The instruction that changes `attribute` to `value`, in the world's own phrasing unless `template` is given."""
    template = template or TRAINING_PHRASINGS[attribute][0]
    return template.format(value=value, where=where_words(value) if attribute == "position" else "")


def context_example(
    rng: random.Random, include_held_out: bool = False, phrasings: str = "world"
) -> tuple[Scene, str, Scene]:
    """(first scene, instruction text, target scene): the target differs from the first in one attribute.

    `phrasings`: "world" (the world's own wording; draws nothing more from `rng`, so the examples are the ones the
    bundled model was made and judged with), "training" (any phrasing of TRAINING_PHRASINGS) or "held_out" (any of
    HELD_OUT_PHRASINGS).
    """
    if phrasings not in PHRASING_SETS:
        raise ValueError(f"`phrasings` must be one of {PHRASING_SETS}, got {phrasings!r}")
    while True:
        first = rng.choice(all_scenes(include_held_out))
        attribute = rng.choice(list(CHANGEABLE))
        value = rng.choice([v for v in CHANGEABLE[attribute] if v != getattr(first, attribute)])
        target = first.replace(**{attribute: value})
        if include_held_out or not target.held_out:
            template = None
            if phrasings != "world":
                template = rng.choice((TRAINING_PHRASINGS if phrasings == "training" else HELD_OUT_PHRASINGS)[attribute])
            return first, change_instruction(attribute, value, template), target


def context_text(first: Scene, instruction: str) -> str:
    """The text form: 'there is a small red circle on the left . now the same shape in blue :'"""
    return f"there is {first.caption()} . {instruction} :"


def corpus(n: int, seed: int, phrasings: str = "world") -> list[str]:
    """Sentences for pretraining the world's LM: captions and context chains with their answers (instructions worded
    as `phrasings` says, see `context_example`)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            lines.append(rng.choice(training_scenes()).caption() + " .")
        else:
            first, instruction, target = context_example(rng, phrasings=phrasings)
            lines.append(f"{context_text(first, instruction)} {target.caption()} .")
    return lines


def vocabulary() -> list[str]:
    """Every word the world's texts use."""
    words = set()
    rng = random.Random(0)
    for line in corpus(4000, seed=0):
        words.update(line.split())
    for s in all_scenes():
        words.update(s.caption().split())
    for attribute, values in CHANGEABLE.items():
        for v in values:
            words.update(change_instruction(attribute, v).split())
    del rng
    return sorted(words)


def preview(path: str, n: int = 36) -> None:
    tiles = images_and_captions(n, seed=0)
    grid = Image.new("RGB", (32 * 6, 32 * ((n + 5) // 6)), (255, 255, 255))
    for i, (image, _, _) in enumerate(tiles):
        grid.paste(image, (32 * (i % 6), 32 * (i // 6)))
    grid.resize((grid.width * 3, grid.height * 3), Image.Resampling.NEAREST).save(path)


def to_array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Preview the shapes world.")
    parser.add_argument("--out", default="world_preview.png")
    args = parser.parse_args()
    preview(args.out)
    print(f"{len(all_scenes())} scenes ({len(HELD_OUT)} held out), vocabulary of {len(vocabulary())} words")
    print("wrote", args.out)

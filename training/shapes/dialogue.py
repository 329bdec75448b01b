"""Multi-turn dialogues in the shapes world: conversations generated from the world, judged strictly.

A conversation starts from an image of a scene; each user turn changes the scene in words (one attribute, or two at
once: "now make it large and blue :"), or asks for words only ("what is it now ?"). The target after each turn follows
from the start scene and every change so far. GILL's answer to a turn is right in words only when its text is exactly
the target's caption (a final "." allowed, nothing else), and its image only when the world's classifier reads all
four attributes of the target in it.

Two sets of wordings: `TRAINING` ones (used by the GILL training documents, `dialogue_documents`) and `HELD_OUT` ones
(used by no training stage). The test conversations (`held_out_conversations`) are drawn from their own seed, and no
training document repeats one of them (`held_out_signatures`), as the held-out combinations are kept out of training.

    python -m benchmarks.bench_dialogue        # the bundled model through GILLConversation (benchmarks/results/dialogue.md)
"""

import dataclasses
import random

from PIL import Image, ImageDraw

from .world import (
    BACKGROUND,
    CHANGEABLE,
    COLOURS,
    HELD_OUT_PHRASINGS,
    POSITIONS,
    SIZES,
    TRAINING_PHRASINGS,
    Scene,
    all_scenes,
    change_instruction,
    draw,
    where_words,
)

# How one value of an attribute is said after "make it" (for two changes in one turn).
def value_words(attribute: str, value: str) -> str:
    if attribute == "shape":
        return f"a {value}"
    if attribute == "position":
        return where_words(value)
    return value


TWO_CHANGE_PHRASINGS = {
    "training": ("now make it {first} and {second}", "please make it {first} and {second}"),
    "held_out": ("now it is {first} and {second}", "now the shape is {first} and {second}"),
}
ASK_PHRASINGS = {
    "training": ("what is it now ?", "what is this ?"),
    "held_out": ("what is the shape now ?", "and what is it now ?"),
}
# "please ..." forms of a single change; the training set also has TRAINING_PHRASINGS, the held-out set its own.
PLEASE_PHRASINGS = {
    "training": {
        "colour": ("please make it {value}",), "shape": ("please make it a {value}",),
        "position": ("please move it {where}",), "size": ("please make it {value}",),
    },
    "held_out": {
        "colour": ("please make the shape {value}",), "shape": ("please make the shape a {value}",),
        "position": ("please make the shape {where}",), "size": ("please make the shape {value}",),
    },
}
PHRASING_SETS = ("training", "held_out")
# Reworded changes (training documents only, `reword_rate`): the value words of a change after 1-4 filler words drawn
# from the training phrasings' own words, so that the model learns that the value words carry a change whatever the
# words around them. A filler that is the lead of a held-out phrasing, or any tail of one ("it is", "the shape"), is
# drawn again: no held-out instruction, nor its last words, is ever a training turn.
FILLER_WORDS = ("now", "make", "it", "the", "shape", "please", "is", "same")
HELD_OUT_FILLERS = frozenset(
    " ".join(lead[i:])
    for templates in (*HELD_OUT_PHRASINGS.values(), *PLEASE_PHRASINGS["held_out"].values(), TWO_CHANGE_PHRASINGS["held_out"])
    for lead in (template.split("{")[0].split() for template in templates)
    for i in range(len(lead))
)
# The words a user of a chat about shapes types beyond the world's captions and instructions.
CHAT_WORDS = ("what", "this", "and", "please", "?")


def single_templates(attribute: str, phrasings: str) -> tuple:
    base = (TRAINING_PHRASINGS if phrasings == "training" else HELD_OUT_PHRASINGS)[attribute]
    return tuple(base) + PLEASE_PHRASINGS[phrasings][attribute]


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn: its text, the scene it asks for, and whether it asks for an image (changes) or words (asks)."""

    text: str
    target: Scene
    kind: str  # "change", "two_changes" or "ask"
    phrasing: str  # "training" or "held_out"

    @property
    def wants_image(self) -> bool:
        return self.kind != "ask"


@dataclasses.dataclass(frozen=True)
class Conversation:
    start: Scene
    turns: tuple

    def signature(self) -> tuple:
        return (self.start.key,) + tuple(turn.text for turn in self.turns)

    def prefixes(self) -> list[tuple]:
        """The signatures of its first 1, 2, ... turns."""
        return [(self.start.key,) + tuple(turn.text for turn in self.turns[:t]) for t in range(1, len(self.turns) + 1)]


def check_phrasings(phrasings: str) -> None:
    if phrasings not in PHRASING_SETS + ("mixed",):
        raise ValueError(f"`phrasings` must be one of {PHRASING_SETS + ('mixed',)}, got {phrasings!r}")


def filler(rng: random.Random) -> str:
    """1-4 words of FILLER_WORDS, never the lead of a held-out phrasing."""
    while True:
        words = " ".join(rng.choices(FILLER_WORDS, k=rng.randint(1, 4)))
        if words not in HELD_OUT_FILLERS:
            return words


def next_turn(rng: random.Random, scene: Scene, phrasings: str, kinds=(("change", 6), ("two_changes", 2), ("ask", 2)),
              include_held_out: bool = False, reword_rate: float = 0.0) -> Turn:
    """A turn from `scene`: a change of one or two attributes, or a question; its target never a held-out
    combination unless `include_held_out`. With `reword_rate` (training phrasings only), that share of changes is
    worded as `filler(rng)` + the value words instead of a template."""
    names, weights = zip(*kinds)
    kind = rng.choices(names, weights)[0]
    phrasing = phrasings if phrasings != "mixed" else rng.choice(PHRASING_SETS)
    if kind == "ask":
        return Turn(rng.choice(ASK_PHRASINGS[phrasing]), scene, kind, phrasing)
    while True:
        count = 1 if kind == "change" else 2
        attributes = rng.sample(list(CHANGEABLE), count)
        values = [rng.choice([v for v in CHANGEABLE[a] if v != getattr(scene, a)]) for a in attributes]
        target = scene.replace(**dict(zip(attributes, values)))
        if target.held_out and not include_held_out:
            continue
        if reword_rate and phrasing == "training" and rng.random() < reword_rate:
            words = " and ".join(value_words(a, v) for a, v in zip(attributes, values))
            return Turn(f"{filler(rng)} {words} :", target, kind, phrasing)
        if count == 1:
            text = change_instruction(attributes[0], values[0], rng.choice(single_templates(attributes[0], phrasing)))
        else:
            words = [value_words(a, v) for a, v in zip(attributes, values)]
            text = rng.choice(TWO_CHANGE_PHRASINGS[phrasing]).format(first=words[0], second=words[1])
        return Turn(f"{text} :", target, kind, phrasing)


def conversation(rng: random.Random, turns: int, phrasings: str = "training", include_held_out: bool = False,
                 reword_rate: float = 0.0) -> Conversation:
    check_phrasings(phrasings)
    if not 0.0 <= reword_rate <= 1.0:
        raise ValueError(f"`reword_rate` must be in [0, 1], got {reword_rate!r}")
    start = rng.choice(all_scenes(include_held_out))
    scene, made = start, []
    for _ in range(turns):
        turn = next_turn(rng, scene, phrasings, include_held_out=include_held_out, reword_rate=reword_rate)
        made.append(turn)
        scene = turn.target
    return Conversation(start, tuple(made))


TEST_SEED = 20_231_223


def held_out_conversations(n: int = 48, seed: int = TEST_SEED, min_turns: int = 2, max_turns: int = 5) -> list[Conversation]:
    """The held-out dialogue test set: `n` conversations of `min_turns`..`max_turns` turns, each turn worded with the
    training or the held-out phrasings (half each, drawn per turn). The first turn of every conversation follows the
    start image."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = min_turns + i % (max_turns - min_turns + 1)
        out.append(conversation(rng, turns, "mixed"))
    return out


# Training documents and the LM's chat transcripts are kept apart from this many test conversations.
HELD_OUT_COUNT = 400


def held_out_signatures(count: int = HELD_OUT_COUNT) -> frozenset:
    """Signatures of every conversation of the test set and of its prefixes (kept out of training documents)."""
    return frozenset(signature for conv in held_out_conversations(count) for signature in conv.prefixes())


def repeats_a_test(conv: Conversation, excluded: frozenset) -> bool:
    return any(signature in excluded for signature in conv.prefixes())


# ---------------------------------------------------------------------------------------------------------------
# Drawings the model was not trained on
# ---------------------------------------------------------------------------------------------------------------
OFF_GRID_BACKGROUNDS = ((245, 245, 245), (236, 230, 214), (208, 214, 226), (232, 222, 232))


def draw_off_grid(scene: Scene, rng: random.Random, size: int = 32, scale: tuple = (0.85, 1.15), shift: float = 0.06,
                  backgrounds: tuple = OFF_GRID_BACKGROUNDS) -> Image.Image:
    """`scene` drawn off the world's grid: its size scaled by `scale` (0.85-1.15), its centre moved by up to `shift`
    (0.06) of the image (each still inside its attribute's range: a small shape stays smaller than any large one, a
    left one left of centre), on another light background (one of `backgrounds`)."""
    factor = 4
    big = size * factor
    image = Image.new("RGB", (big, big), rng.choice(backgrounds))
    canvas = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx = (cx + rng.uniform(-shift, shift)) * big
    cy = (cy + rng.uniform(-shift, shift)) * big
    r = SIZES[scene.size] * rng.uniform(*scale) * big / 2 * 1.6
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        s = r * 0.88
        canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        canvas.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


# Varied drawings for training (`vary_rate` of GILL's given images): a narrower variation than the test's off-grid
# drawings (size 0.9-1.1, centre within 0.04) on backgrounds of their own, so that the off-grid test still shows
# drawings beyond what training saw.
TRAINING_BACKGROUNDS = ((255, 255, 255), (250, 248, 240), (228, 236, 228), (242, 230, 230))


def draw_varied(scene: Scene, rng: random.Random, size: int = 32) -> Image.Image:
    return draw_off_grid(scene, rng, size, scale=(0.9, 1.1), shift=0.04, backgrounds=TRAINING_BACKGROUNDS)


def drawing(scene: Scene, rng: random.Random, vary_rate: float = 0.0, size: int = 32) -> Image.Image:
    """A training drawing of `scene`: the world's own (jitter 1), or at `vary_rate` a varied one (`draw_varied`).
    At rate 0 it draws exactly what `world.draw` with one seed from `rng` draws."""
    seed = rng.randrange(1 << 30)
    if vary_rate and rng.random() < vary_rate:
        return draw_varied(scene, random.Random(seed), size)
    return draw(scene, size, jitter=1, seed=seed)


def start_image(conv: Conversation, seed: int, off_grid: bool = False, size: int = 32) -> Image.Image:
    rng = random.Random(seed)
    if off_grid:
        return draw_off_grid(conv.start, rng, size)
    return draw(conv.start, size, jitter=1, seed=rng.randrange(1 << 30))


# ---------------------------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------------------------
def words_exact(text: str, target: Scene) -> bool:
    """Strict: the answer's words are the target's caption, with at most a final "." after it; nothing else."""
    words = " ".join(text.split())
    if words.endswith(" ."):
        words = words[:-2]
    return words == target.caption()


def answer_parts(answer: dict) -> tuple[str, list[dict]]:
    """An assistant message -> (its text parts joined, its image parts)."""
    content = answer["content"]
    if isinstance(content, str):
        return content, []
    texts = [part["text"] for part in content if part["type"] == "text"]
    images = [part for part in content if part["type"] == "image"]
    return " ".join(texts), images


# ---------------------------------------------------------------------------------------------------------------
# Training documents
# ---------------------------------------------------------------------------------------------------------------
def dialogue_segments(conv: Conversation, image_files: list[str]) -> list[dict]:
    """The interleaved document of a conversation as `GILLConversation` renders it for a model without a chat
    template (the messages' contents in order): `[start image] turn_1 answer_1 ... turn_n answer_n`, where an answer
    to a change is `<caption>` then its image, and an answer to a question is `<caption> .`. Only the last answer's
    image is a target (its `[IMG]` tokens are what the model writes); earlier answers' images come back as input
    images, as a chat gives them back. `image_files`: the start image, then one per turn (unused for questions)."""
    scenes = [conv.start] + [turn.target for turn in conv.turns]
    segments = [{"image": image_files[0], "caption": conv.start.caption(), "target": False}]
    last = len(conv.turns) - 1
    for t, turn in enumerate(conv.turns):
        caption = scenes[t + 1].caption()
        if not turn.wants_image:
            segments.append({"text": f"{turn.text} {caption} ."})
            continue
        segments.append({"text": f"{turn.text} {caption}"})
        segments.append({"image": image_files[t + 1], "caption": caption, "target": t == last})
    return segments


def training_conversation(rng: random.Random, max_turns: int, excluded: frozenset, reword_rate: float = 0.0) -> Conversation:
    """A training conversation (training phrasings, `reword_rate` of its changes reworded, no held-out combination,
    never one of the test set), whose last turn asks for an image."""
    while True:
        turns = rng.randint(1, max_turns)
        conv = conversation(rng, turns, "training", reword_rate=reword_rate)
        if conv.turns[-1].wants_image and not repeats_a_test(conv, excluded):
            return conv


def transcript_text(conv: Conversation) -> str:
    """A conversation in words only: `there is <start> . <turn 1> <answer 1> ... .` (the LM's corpus form)."""
    scenes = [conv.start] + [turn.target for turn in conv.turns]
    text = f"there is {conv.start.caption()} ."
    for t, turn in enumerate(conv.turns):
        text += f" {turn.text} {scenes[t + 1].caption()}" + (" ." if not turn.wants_image else "")
    return text if text.endswith(" .") else text + " ."


def dialogue_corpus(n: int, seed: int, max_turns: int = 5) -> list[str]:
    """`n` chat transcripts in words (training phrasings, never a test conversation) for the LM's pretraining."""
    rng = random.Random(seed)
    excluded = held_out_signatures() if n else frozenset()
    lines = []
    while len(lines) < n:
        conv = conversation(rng, rng.randint(1, max_turns), "training")
        if not repeats_a_test(conv, excluded):
            lines.append(transcript_text(conv))
    return lines

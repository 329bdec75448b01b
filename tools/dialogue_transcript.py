"""Runs the README's example conversation on the bundled shapes-world GILL (or another shapes-world pipeline) the way
`gill chat` does, judges every answer, and writes the transcript as one PNG strip plus its Markdown.

    python -m tools.dialogue_transcript                       # -> docs/dialogue.png, docs/dialogue.md
    python -m tools.dialogue_transcript --pipeline DIR/bundle/shapes_pipeline --index DIR/bundle/shapes_index \
        --png /tmp/d.png --md /tmp/d.md

Each turn goes through `GILLConversation` with the model's CLI preset and one seed, as `gill chat` sends it; the answer's words are right only when they are exactly the target caption, its image
only when the world's attribute classifier reads all four attributes of the target (benchmarks/bench_dialogue.py's
judges).
"""

import argparse
import logging
import os

from PIL import Image, ImageDraw, ImageFont

from benchmarks.bench_dialogue import image_right, load_judged_pipeline
from training.shapes.dialogue import Conversation, Turn, answer_parts, words_exact
from training.shapes.world import Scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("dialogue_transcript")

# The README's example: the bundled example picture (a small red circle on the left), then one change per turn; "now a
# triangle" is a user's own wording (neither the training nor the held-out phrasings of training/shapes/dialogue.py).
START = Scene("circle", "red", "left", "small")
README_CONVERSATION = Conversation(START, (
    Turn("now the same shape in blue :", START.replace(colour="blue"), "change", "training"),
    Turn("now make it large :", START.replace(colour="blue", size="large"), "change", "training"),
    Turn("now a triangle :", START.replace(colour="blue", size="large", shape="triangle"), "change", "user"),
    Turn("what is it now ?", START.replace(colour="blue", size="large", shape="triangle"), "ask", "training"),
))
SCALE = 4  # the world's 32x32 images, drawn 4x larger (nearest neighbour) in the strip


def run(pipe, classifier, first_image, settings, seed: int) -> list[dict]:
    """The conversation, turn by turn -> one record per turn (texts, the image shown, the judges' verdicts)."""
    from gill_pipeline import GILLConversation
    from gill_pipeline.demo.settings import call_kwargs

    chat = GILLConversation(pipe)
    records = []
    for t, turn in enumerate(README_CONVERSATION.turns):
        content = [first_image, turn.text] if t == 0 else [turn.text]
        text, images = answer_parts(chat.send(content, **call_kwargs(settings, seed=seed)))
        shown = images[0] if images else None
        records.append({
            "turn": t + 1, "user": turn.text, "user_image": first_image if t == 0 else None, "text": text,
            "image": shown["image"] if shown else None, "source": shown.get("source") if shown else None,
            "target": turn.target.caption(), "wants_image": turn.wants_image,
            "words_right": words_exact(text, turn.target),
            "image_right": image_right(classifier, shown["image"], turn.target) if shown else not turn.wants_image,
        })
    return records


def verdict(record: dict) -> str:
    words = "words right" if record["words_right"] else "words WRONG"
    if record["wants_image"]:
        image = "image right" if record["image_right"] else ("no image" if record["image"] is None else "image WRONG")
    else:
        image = "no image asked" if record["image"] is None else "image not asked for"
    return f"{words}, {image}"


def strip(records: list[dict]) -> Image.Image:
    """One PNG: a row per turn, the user's words (and picture) on the left, GILL's answer and image on the right."""
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    side = 32 * SCALE
    row_height, width = side + 20, 980
    canvas = Image.new("RGB", (width, 10 + row_height * len(records)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, record in enumerate(records):
        top = 10 + i * row_height
        if record["user_image"] is not None:
            canvas.paste(record["user_image"].convert("RGB").resize((side, side), Image.NEAREST), (10, top))
        draw.text((20 + side, top + 8), f"you>  {record['user']}", fill="black", font=font)
        draw.text((20 + side, top + 40), f"gill> {record['text']}", fill=(20, 60, 160), font=font)
        draw.text((20 + side, top + 72), f"target: {record['target']}", fill=(90, 90, 90), font=small)
        ok = record["words_right"] and record["image_right"]
        draw.text((20 + side, top + 92), verdict(record), fill=(0, 120, 0) if ok else (180, 0, 0), font=small)
        if record["image"] is not None:
            left = width - side - 10
            canvas.paste(record["image"].convert("RGB").resize((side, side), Image.NEAREST), (left, top))
            draw.text((left - 80, top + side - 16), record["source"] or "", fill=(90, 90, 90), font=small)
        draw.line([(10, top + side + 10), (width - 10, top + side + 10)], fill=(220, 220, 220))
    return canvas


def markdown(records: list[dict], png: str, command: str) -> str:
    lines = ["# The README's example conversation", "",
             f"Written by `{command}` (`gill chat`'s settings on the bundled model; words judged exactly, images by the "
             "world's attribute classifier; `example.png` is the bundled example picture, a small red circle on the left).",
             "", f"![the conversation]({os.path.basename(png)})", "", "```text"]
    for record in records:
        first = "example.png " if record["turn"] == 1 else ""
        lines.append(f"you> {first}{record['user']}")
        image = f"   [{record['source']} image]" if record["image"] is not None else ""
        lines.append(f"gill> {record['text']}{image}   <- {verdict(record)}")
    return "\n".join(lines + ["```", ""])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="a shapes-world pipeline folder (default: the bundled model)")
    parser.add_argument("--index", default=None, help="its retrieval set (default: the bundled one with the bundled model)")
    parser.add_argument("--classifier", default=None, help="the world's attribute classifier (default: the bundled one)")
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "dialogue.png"))
    parser.add_argument("--md", default=os.path.join(ROOT, "docs", "dialogue.md"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("pipeline", "index", "classifier"):
        value = getattr(args, name)
        if value is not None and not os.path.isdir(value):
            parser.error(f"--{name} must be a folder, got {value!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from gill_pipeline.bundled.presets import SHAPES_MODEL, example_image
    from gill_pipeline.demo.settings import preset_settings

    pipe, classifier = load_judged_pipeline(args.pipeline, args.index, args.classifier)
    records = run(pipe, classifier, example_image(SHAPES_MODEL), preset_settings(SHAPES_MODEL), args.seed)
    for path in (args.png, args.md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    strip(records).save(args.png)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write(markdown(records, args.png, "python -m tools.dialogue_transcript"))
    logger.info("wrote %s and %s", args.png, args.md)
    return records


if __name__ == "__main__":
    main()

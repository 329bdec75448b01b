"""Benchmark of multi-turn dialogue on the shapes world (issue 23, section 1), judged strictly.

Held-out conversations of 2-5 turns (`training/shapes/dialogue.py`: a start image, then changes of colour, size,
position or shape in words, two changes in one turn, and "what is it now ?" asking for words only; half the turns in
phrasings no training stage uses) run through `GILLConversation` with the CLI preset of the bundled model (what
`gill chat` sends), one turn at a time, the answers' images given back as the chat gives them back. Judged per turn
number:
- words: exact only when the answer's text is the target caption, a final "." allowed, nothing else;
- image shown: the world's classifier reads all four attributes of the target (no image = wrong) for turns that ask
  for an image; turns asking for words only count an image shown there apart;
- both: words and image right (for word-only turns: words right and no image);
- with image_mode "both", each candidate (generated, retrieved) where it exists.
The same conversations are run again with start images drawn off the world's grid (other sizes and positions within
each attribute's range, other backgrounds). Writes benchmarks/results/dialogue.md (and .json). The defaults (192
conversations, 96 of them again off the grid: 48 and 24 reach turn 5) take about 3 minutes on 2 CPU threads; the
first 48 are the set of the earlier results files (`--n 48 --off-grid 24`). At most 400: training documents are kept
apart from the first 400 (`held_out_signatures`).

    python -m benchmarks.bench_dialogue [--pipeline DIR --index DIR --classifier DIR] [--n 192] [--out PATH]
"""

import argparse
import json
import logging
import os
import time

import torch

from training.shapes.classifier import AttributeClassifier, to_unit_tensor
from training.shapes.dialogue import (
    CHAT_WORDS,
    HELD_OUT_COUNT,
    answer_parts,
    start_image,
    held_out_conversations,
    words_exact,
)

RESULTS = os.path.join(os.path.dirname(__file__), "results", "dialogue")
MAX_TURNS = 5


def image_right(classifier, image, target) -> bool:
    if image is None:
        return False
    predicted = classifier.predict(to_unit_tensor([image.convert("RGB")]))[0]
    return bool((predicted == torch.tensor(target.labels())).all())


def load_judged_pipeline(pipeline: str | None, index: str | None, classifier: str | None):
    """A shapes-world pipeline (default: the bundled one, with its retrieval set) and the world's classifier that
    judges its images (default: the bundled one)."""
    from gill_pipeline import GILLPipeline
    from gill_pipeline.bundled import BUNDLED_CLASSIFIER, BUNDLED_INDEX, load_bundled_pipeline

    if pipeline is None:
        pipe, index = load_bundled_pipeline(with_index=False), index or BUNDLED_INDEX
    else:
        pipe = GILLPipeline.from_pretrained(pipeline, dtype=torch.float32)
    if index:
        pipe.load_retrieval_index(index)
    pipe.set_progress_bar_config(disable=True)
    return pipe, AttributeClassifier.from_pretrained(classifier or BUNDLED_CLASSIFIER).eval()


def run_conversation(pipe, classifier, conv, first_image, settings, seed: int) -> list[dict]:
    from gill_pipeline import GILLConversation
    from gill_pipeline.demo.settings import call_kwargs

    chat = GILLConversation(pipe)
    records = []
    for t, turn in enumerate(conv.turns):
        content = [first_image, turn.text] if t == 0 else [turn.text]
        answer = chat.send(content, **call_kwargs(settings, seed=seed + t))
        text, images = answer_parts(answer)
        shown = images[0] if images else None
        record = {
            "turn": t + 1, "kind": turn.kind, "phrasing": turn.phrasing, "wants_image": turn.wants_image,
            "target": turn.target.caption(), "text": text, "words": words_exact(text, turn.target),
            "shown": shown is not None, "source": shown.get("source") if shown else None,
        }
        if turn.wants_image:
            record["image"] = image_right(classifier, shown["image"], turn.target) if shown else False
            record["both"] = record["words"] and record["image"]
            for candidate in ([shown] + [{"image": a.image, "source": a.source} for a in shown.get("alternatives") or []]
                              if shown else []):
                record[f"candidate_{candidate['source']}"] = image_right(classifier, candidate["image"], turn.target)
        else:
            record["both"] = record["words"] and shown is None
        records.append(record)
    return records


def rate(records, key, where=lambda r: True):
    chosen = [r for r in records if where(r) and key in r]
    return (sum(bool(r[key]) for r in chosen) / len(chosen), len(chosen)) if chosen else (None, 0)


def per_turn(records) -> list[dict]:
    rows = []
    for t in range(1, MAX_TURNS + 1):
        at = [r for r in records if r["turn"] == t]
        if not at:
            continue
        image_turns = lambda r: r["wants_image"]  # noqa: E731
        ask_turns = lambda r: not r["wants_image"]  # noqa: E731
        rows.append({
            "turn": t,
            "n": len(at),
            "image": rate(at, "image"),
            "no_image": sum(1 for r in at if r["wants_image"] and not r["shown"]),
            "words": rate(at, "words"),
            "both": rate(at, "both"),
            "words_held_out_phrasing": rate(at, "words", lambda r: r["phrasing"] == "held_out"),
            "image_held_out_phrasing": rate(at, "image", lambda r: r["phrasing"] == "held_out"),
            "two_changes_image": rate(at, "image", lambda r: r["kind"] == "two_changes"),
            "ask_words": rate(at, "words", ask_turns),
            "ask_image_shown": sum(1 for r in at if ask_turns(r) and r["shown"]),
            "generated": rate(at, "candidate_generated", image_turns),
            "retrieved": rate(at, "candidate_retrieved", image_turns),
        })
    return rows


def fmt(cell) -> str:
    value, n = cell
    return "-" if value is None else f"{value:.2f} ({n})"


def table(rows, title: str) -> list[str]:
    lines = [f"### {title}", "",
             "| turn | turns | image shown exact | no image (asked for one) | words exact | both | generated candidate | "
             "retrieved candidate | image, held-out phrasing | words, held-out phrasing | image, two changes | "
             "words, 'what is it' turns | image shown on a words-only turn |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['turn']} | {r['n']} | {fmt(r['image'])} | {r['no_image']} | {fmt(r['words'])} | {fmt(r['both'])} | "
            f"{fmt(r['generated'])} | {fmt(r['retrieved'])} | {fmt(r['image_held_out_phrasing'])} | "
            f"{fmt(r['words_held_out_phrasing'])} | {fmt(r['two_changes_image'])} | {fmt(r['ask_words'])} | "
            f"{r['ask_image_shown']} |"
        )
    return lines + [""]


def transcript(records, conv, limit: int = 5) -> list[str]:
    lines = [f"start: `{conv.start.caption()}` (image)"]
    for r in records[:limit]:
        mark = lambda ok: "right" if ok else "WRONG"  # noqa: E731
        image = f"image {mark(r['image'])}" if r["wants_image"] else ("an image shown" if r["shown"] else "no image")
        lines.append(f"- turn {r['turn']}: `{conv.turns[r['turn'] - 1].text}` -> `{r['text']}` (target `{r['target']}`; "
                     f"words {mark(r['words'])}; {image})")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="GILL pipeline folder (default: the bundled model)")
    parser.add_argument("--index", default=None, help="retrieval index folder (default: the bundled one)")
    parser.add_argument("--classifier", default=None, help="the world's classifier (default: the bundled one)")
    parser.add_argument("--n", type=int, default=192, help="conversations in the test set (2-5 turns each; 1-400)")
    parser.add_argument("--off-grid", type=int, default=96, help="conversations run again with off-grid start images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine more threads wait on each other)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", default=[], metavar="OPTION=VALUE",
                        help="overrides one option of the preset (e.g. img_logit_scale=1), for recipe experiments")
    parser.add_argument("--label", default="the bundled model", help="what is measured (for the results file)")
    parser.add_argument("--out", default=RESULTS, help="results path without extension")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= HELD_OUT_COUNT:
        parser.error(f"--n must be 1-{HELD_OUT_COUNT} (training documents are kept apart from the first "
                     f"{HELD_OUT_COUNT} test conversations only), got {args.n}")
    if not 0 <= args.off_grid <= args.n:
        parser.error(f"--off-grid must be 0-{args.n} (--n), got {args.off_grid}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()

    from gill_pipeline.bundled.presets import SHAPES_MODEL
    from gill_pipeline.demo.settings import preset_settings

    pipe, classifier = load_judged_pipeline(args.pipeline, args.index, args.classifier)
    settings = preset_settings(SHAPES_MODEL)
    for item in args.setting:
        option, _, value = item.partition("=")
        if option not in settings or not value:
            parser.error(f"--setting must be OPTION=VALUE with OPTION one of {sorted(settings)}, got {item!r}")
        settings[option] = type(settings[option])(value) if settings[option] is not None else int(value)

    conversations = held_out_conversations(args.n)
    on_grid, off_grid, examples = [], [], []
    for i, conv in enumerate(conversations):
        records = run_conversation(pipe, classifier, conv, start_image(conv, args.seed + i), settings, args.seed + 100 * i)
        on_grid += records
        if i < 4:
            examples.append(transcript(records, conv))
    for i, conv in enumerate(conversations[: args.off_grid]):
        off_grid += run_conversation(pipe, classifier, conv, start_image(conv, args.seed + i, off_grid=True), settings,
                                     args.seed + 100 * i)
    unknown = [w for w in CHAT_WORDS if pipe.tokenizer.convert_tokens_to_ids(w) == pipe.tokenizer.unk_token_id]
    report = {
        "label": args.label, "settings": settings, "conversations": len(conversations),
        "per_turn": per_turn(on_grid), "off_grid_per_turn": per_turn(off_grid),
        "unknown_chat_words": unknown, "examples": examples, "seconds": round(time.time() - start, 1),
        "records": on_grid, "off_grid_records": off_grid,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    logging.getLogger("bench.dialogue").info("wrote %s.md", args.out)
    return report


def markdown(report: dict) -> str:
    lines = [
        "# Multi-turn dialogue on the shapes world (issue 23)", "",
        f"Measured: {report['label']}, through `GILLConversation` with the CLI preset (`gill chat`'s settings: "
        f"`{report['settings']}`). {report['conversations']} held-out conversations of 2-5 turns "
        "(`training/shapes/dialogue.py`, `held_out_conversations`): a start image, then changes in words (one attribute, "
        "or two at once), and 'what is it now ?' turns asking for words only; half the turns in phrasings no "
        "training stage uses. Judges: words exact only when the answer's text is the target caption (a final '.' "
        "allowed, nothing else); images by the world's classifier, exact = all four attributes, no image = wrong. "
        "Each cell: rate (count).", "",
    ]
    lines += table(report["per_turn"], "Start images drawn as the world draws them")
    lines += table(report["off_grid_per_turn"], "Start images drawn off the grid (other sizes, positions, backgrounds)")
    unknown = report["unknown_chat_words"]
    lines += [f"A user's usual chat words {list(CHAT_WORDS)}: "
              + (f"unknown to the tokenizer: {unknown}." if unknown else "all known to the tokenizer."), "",
              "## Example conversations", ""]
    for example in report["examples"]:
        lines += example + [""]
    lines.append(f"Took {report['seconds']} s. Command: `python -m benchmarks.bench_dialogue`.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

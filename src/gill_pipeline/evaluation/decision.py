"""The retrieve-or-generate decision on the PartiPrompts decision files of the GILL release (paper, section 3.3).

Each prompt is read by GILL with `[IMG0]` forced after it; the decision head's choice (`ret` when p(retrieve) > 0.5)
is compared with the human label. Prompts labelled `same` (or with tied votes) have no label and are only counted.
The reference row `majority` always answers the most common label of the evaluated prompts.
"""

import os

from .datasets import GENERATE_LABEL, RETRIEVE_LABEL, Loaded, read_partiprompts_decisions
from .metrics import decision_report
from .records import RecordLog, check_settings, ignored_notes, write_summary
from .runner import dataset_or_read, limit_examples, run_batches
from .systems import GILLSystem


PROTOCOL = "decision"


def evaluate_decision(
    pipe,
    decisions_file: str,
    output_dir: str,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    dataset: Loaded | None = None,
) -> dict:
    r"""
    Accuracy and F1 of GILL's decision head against the human labels of a PartiPrompts decision file
    (`PartiPromptsDecisionsConfident.tsv`, or `PartiPromptsAllDecisions_*.tsv` by majority vote).

    Args:
        pipe ([`GILLPipeline`]): the GILL pipeline under test (no retrieval index is needed: the head is read).
        decisions_file (`str`): the TSV file.
        limit (`int`, *optional*): the first `limit` prompts only.
        dataset ([`Loaded`], *optional*): what `read_partiprompts_decisions(decisions_file)` returned, when read
            already (`gill evaluate` reads and checks it before loading any model).
    """
    loaded = dataset_or_read(dataset, read_partiprompts_decisions, decisions_file)
    prompts = limit_examples(loaded.examples, limit)
    settings = dict(protocol=PROTOCOL, decisions_file=os.path.abspath(decisions_file))
    check_settings(output_dir, settings)
    gill = GILLSystem(pipe)
    log = RecordLog(output_dir, fields=("label", "p_retrieve", "predicted"))

    def work(batch, seeds):
        probs = gill.decision_probs([[p.prompt] for p in batch])
        return [
            {
                "id": p.id, "prompt": p.prompt, "label": p.label, "p_retrieve": float(probs[i, 1]),
                "predicted": RETRIEVE_LABEL if float(probs[i, 1]) > 0.5 else GENERATE_LABEL,
            }
            for i, p in enumerate(batch)
        ]

    run_batches(log, prompts, gill.name, work, batch_size, 0, progress, desc=PROTOCOL)
    wanted = {p.id for p in prompts}
    records = [r for r in log.of(gill.name) if r["id"] in wanted and r["label"] is not None]
    labels = [r["label"] for r in records]
    results = {gill.name: decision_report([r["predicted"] for r in records], labels)}
    common = max((RETRIEVE_LABEL, GENERATE_LABEL), key=labels.count)
    results["majority"] = decision_report([common] * len(labels), labels)
    notes = [
        f"{len(prompts) - len(records)} of {len(prompts)} prompts have no label (`same`, or a tied vote) and are "
        "left out of the scores.",
        f"Predicted `ret` when the decision head's p(retrieve) > 0.5; `majority` always answers `{common}`.",
    ] + ignored_notes(log)
    return write_summary(output_dir, PROTOCOL, results, settings, notes)

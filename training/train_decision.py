"""Train GILL's decision head (generate or retrieve?) on prompts labelled by people, after the main training.

    python -m training.train_decision --pipeline runs/gill/pipeline \
        --data ../shared/data/gill_original/PartiPromptsDecisionsConfident.tsv

The data format is the PartiPrompts decisions TSV of the reference: columns `Prompt` and `Decision` (`gen`, `ret`;
rows marked `same` are dropped). Features are the LM's last-layer hidden states at `[IMG0]` of
`[BOS] prompt [IMG0]..[IMG{r-1}]`, as in the reference notebook; the head (Dropout + Linear) trains full-batch with
AdamW. F1 is reported on a held-out split, and the head is written into the pipeline's `gill/` folder.

Only the LM, the tokenizer and the learned parts are loaded (no UNet, VAE, scheduler or vision encoder); the LM in
`--dtype` (e.g. bfloat16 for a 6.7B LM), the learned parts in the float32 they were trained and are saved in.
"""

import argparse
import csv
import json
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F

from gill_pipeline import GILLModel, GILLPipeline
from gill_pipeline.constants import DECISION_GENERATE, DECISION_RETRIEVE, GILL_COMPONENT
from training.data import Collator
from training.records import RowProblems, decoded_lines
from training.model_forward import GILLTrainingModel
from training.setup_models import DTYPES

logger = logging.getLogger("train_decision")
LABELS = {"gen": DECISION_GENERATE, "ret": DECISION_RETRIEVE}


def read_decisions(path: str) -> tuple[list[str], list[int]]:
    """Prompts and their labels; a row that is not UTF-8 or lacks columns is skipped, logged with its line."""
    lines = decoded_lines(path)  # a UTF-8 BOM before the header is dropped
    _, header_text, problem = next(lines, (1, "", None))
    header = next(csv.reader([header_text or ""], delimiter="\t"), [])
    if problem is not None or "Prompt" not in header or "Decision" not in header:
        raise ValueError(f"`data` {path!r} must be a TSV with `Prompt` and `Decision` columns, got {problem or header}.")
    p, d = header.index("Prompt"), header.index("Decision")
    problems = RowProblems()
    prompts, labels = [], []
    for line_number, text, problem in lines:
        row = next(csv.reader([text], delimiter="\t"), []) if problem is None else []
        if problem is None and len(row) <= max(p, d):
            problem = f"expected {len(header)} columns, got {len(row)}"
        if problem is not None:
            problems.add(path, line_number, problem)
            continue
        decision = row[d].strip()
        if decision in LABELS and row[p].strip():
            prompts.append(row[p].strip())
            labels.append(LABELS[decision])
    if problems:
        logger.warning("`data` %r: %d malformed rows skipped.", path, len(problems))
    if len(set(labels)) < 2:
        raise ValueError(f"`data` {path!r} needs prompts labelled both `gen` and `ret`; got {len(labels)} usable rows.")
    return prompts, labels


@torch.no_grad()
def img0_hidden_states(pipe, prompts: list[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """LM hidden states at `[IMG0]` of `[BOS] prompt [IMG0..]`, one row per prompt `(N, lm_hidden_dim)`."""
    collator = Collator(pipe.tokenizer, len(pipe.img_token_ids), max_length)
    model = GILLTrainingModel(
        pipe.llm, pipe.gill, None, pipe.img_token_ids, pad_token_id=pipe.tokenizer.pad_token_id or 0,
        bos_token_id=collator.bos,
    )
    model.to(pipe.device).eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        captions = [collator.tokenize(p) for p in prompts[start : start + batch_size]]
        ids, _, mask, locations = model.img_sequences(captions, concat=False)
        _, hidden = model.run_lm(model.embed_tokens(ids.to(pipe.device)), mask.to(pipe.device))
        rows.append(hidden[locations[:, 0], locations[:, 1]].float().cpu())
    return torch.cat(rows)


def f1_scores(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    scores = {}
    for name, cls in LABELS.items():
        tp = int(((predictions == cls) & (labels == cls)).sum())
        fp = int(((predictions == cls) & (labels != cls)).sum())
        fn = int(((predictions != cls) & (labels == cls)).sum())
        scores[f"f1_{name}"] = 2 * tp / max(2 * tp + fp + fn, 1)
    scores["f1_macro"] = (scores["f1_gen"] + scores["f1_ret"]) / 2
    scores["accuracy"] = float((predictions == labels).float().mean())
    return scores


def train_head(head, features, labels, steps: int, lr: float, weight_decay: float, seed: int):
    torch.manual_seed(seed)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    dtype = head[1].weight.dtype
    for step in range(steps):
        loss = F.cross_entropy(head(features.to(dtype)), labels)
        if not torch.isfinite(loss):  # nothing non-finite may reach the head that is saved into the pipeline
            raise FloatingPointError(
                f"The decision head's loss is {loss.item()} at step {step}: lower `--lr` or check the LM's hidden "
                "states (a float16 LM can overflow). Nothing was saved."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise FloatingPointError("The decision head's weights are not finite after training: lower `--lr`. Nothing was saved.")
    head.eval()
    return loss.item()


def load_pipeline(folder: str, dtype: torch.dtype) -> GILLPipeline:
    """The pipeline without its image decoder and vision encoder (features come from the LM alone), the LM in
    `dtype`. The learned parts are loaded apart, in float32: the pipeline's `gill/` is saved again with the new head,
    and a cast would round every other learned weight."""
    gill = GILLModel.from_pretrained(os.path.join(folder, GILL_COMPONENT))
    return GILLPipeline.from_pretrained(
        folder, gill=gill, dtype=dtype, unet=None, vae=None, scheduler=None, image_encoder=None, feature_extractor=None
    )


def build_parser():
    parser = argparse.ArgumentParser(description="Train GILL's decision head; the head is saved into the pipeline.")
    parser.add_argument("--pipeline", required=True, help="A trained GILL pipeline folder (its gill/ is updated).")
    parser.add_argument("--data", required=True, help="PartiPrompts-style decisions TSV (Prompt, Decision columns).")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="Held-out fraction for the F1 report.")
    parser.add_argument("--steps", type=int, default=2000, help="Full-batch AdamW steps (reference: 2000).")
    parser.add_argument("--lr", type=float, default=1e-3, help="Learning rate (reference: 1e-3).")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Weight decay (reference: 0).")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per prompt, BOS and [IMG] tokens included.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the frozen LM (the head and the other learned parts stay float32).")
    parser.add_argument("--metrics-file", default=None, help="Also write the metrics here as JSON.")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"`--val-fraction` must be in (0, 1), got {args.val_fraction!r}.")
    if args.steps <= 0:
        raise ValueError(f"`--steps` must be positive, got {args.steps!r}.")
    for name in ("lr", "weight_decay"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            kind = "positive" if name == "lr" else "non-negative"
            raise ValueError(f"`--{name.replace('_', '-')}` must be a finite {kind} number, got {value!r}.")
    pipe = load_pipeline(args.pipeline, DTYPES[args.dtype]).to(args.device)
    prompts, labels = read_decisions(args.data)
    features = img0_hidden_states(pipe, prompts, args.max_length).to(args.device)
    labels = torch.tensor(labels, device=args.device)

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    n_val = max(1, int(round(len(prompts) * args.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    head = pipe.gill.decision_head
    head.requires_grad_(True)
    final_loss = train_head(head, features[train], labels[train], args.steps, args.lr, args.weight_decay, args.seed)
    with torch.no_grad():
        predictions = head(features[val].to(head[1].weight.dtype)).argmax(-1)
    metrics = {"train_examples": len(train), "val_examples": n_val, "final_train_loss": final_loss}
    metrics.update({f"val_{k}": v for k, v in f1_scores(predictions, labels[val]).items()})
    logger.info("Decision head: %s", metrics)

    pipe.gill.eval()
    pipe.gill.save_pretrained(os.path.join(args.pipeline, GILL_COMPONENT))
    logger.info("Saved the decision head into %s", os.path.join(args.pipeline, GILL_COMPONENT))
    if args.metrics_file:
        with open(args.metrics_file, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

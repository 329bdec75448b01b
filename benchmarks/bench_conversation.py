"""Benchmark of multi-turn dialogue (issue: conversations): turn 8 with the KV cache of turns 1-7 reused vs recomputed.

A random-weight LM of OPT-125m shape (with the small test tokenizer's vocabulary) behind a ChatML chat template; seven earlier turns (a user message of about 20
tokens and a 16-token answer each) make a context of several hundred positions. Turn 8 is timed three ways, side by
side in one run, from the same conversation state:
- reused: `GILLConversation` (the cache of turns 1-7 is cut back to the shared prefix; only the new tokens run),
- recomputed: the same messages with no past (the whole conversation is prefilled again, then decoded with a cache),
- no cache: `use_cache=False` (the reference's way: the whole sequence re-run for every token).
Reported: time to the first answer token (what a user waits for) and the whole turn. Figures are ratios; both
answers are checked to be the same. Writes benchmarks/results/conversation.md.

    python -m benchmarks.bench_conversation [--repeats 3] [--threads 2] [--answer-tokens 16]
"""

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from benchmarks.models import opt_125m_shaped
from gill_pipeline import GILLConversation, GILLPipeline
from gill_pipeline.testing import build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder

RESULTS = os.path.join(os.path.dirname(__file__), "results", "conversation.md")
USER_TURNS = [
    "Tell me about the small red circle on the left of the picture.",
    "And what about the large blue square in the middle of it?",
    "Is there a green triangle at the top of the scene as well?",
    "Describe the yellow circle at the bottom right, please.",
    "Which of these shapes is the biggest one in the picture?",
    "Now think about a purple square on the right side instead.",
    "Could the orange triangle be placed in the middle of it?",
    "Summarise every shape we talked about in one short sentence.",
]


class FirstTokenClock:
    """A minimal streamer: records when the first answer token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None

    def put(self, value):
        if self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self):
        pass


def build_pipeline(tokenizer, llm) -> GILLPipeline:
    sd = build_tiny_stable_diffusion(cross_attention_dim=32)
    encoder, processor = build_tiny_vision_encoder()
    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=sd, image_encoder=encoder, feature_extractor=processor
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dialogue_before_last_turn(pipe, settings) -> GILLConversation:
    conversation = GILLConversation(pipe, **settings)
    for text in USER_TURNS[:-1]:
        conversation.send(text)
    return conversation


def time_turn(pipe, conversation, settings, mode: str) -> tuple[float, float, str]:
    """(seconds to the first token, seconds for the whole turn, answer text) of the last turn."""
    past = copy.deepcopy(conversation.past) if mode == "reused" else None
    messages = conversation.messages + [{"role": "user", "content": USER_TURNS[-1]}]
    kwargs = dict(settings, use_cache=mode != "no cache")
    clock = FirstTokenClock()
    out = pipe(messages, past=past, streamer=clock, **kwargs)
    total = time.perf_counter() - clock.start
    if mode == "reused" and out.past.reused == 0:
        raise RuntimeError("the reused turn did not reuse the cache")
    return clock.first, total, out.texts[0]


def measure(pipe, settings, repeats: int) -> tuple[dict, int, int]:
    conversation = dialogue_before_last_turn(pipe, settings)
    modes = ("reused", "recomputed", "no cache")
    samples = {mode: [] for mode in modes}
    answers = {}
    for mode in modes:  # warm-up
        answers[mode] = time_turn(pipe, conversation, settings, mode)[2]
    if len(set(answers.values())) != 1:
        raise RuntimeError(f"the three ways give different answers: {answers}")
    for _ in range(repeats):
        for mode in modes:  # alternating, so machine noise hits every mode alike
            first, total, _ = time_turn(pipe, conversation, settings, mode)
            samples[mode].append((first, total))
    medians = {
        mode: (statistics.median(s[0] for s in values), statistics.median(s[1] for s in values))
        for mode, values in samples.items()
    }
    context = len(conversation.past)
    check = copy.deepcopy(conversation.past)
    messages = conversation.messages + [{"role": "user", "content": USER_TURNS[-1]}]
    reused = pipe(messages, past=check, **settings).past.reused
    return medians, context, reused


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1 is the most stable setting on a shared machine")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="a tiny LM instead of OPT-125m's shape (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = build_tiny_tokenizer(chat_template=True, model_max_length=2048)
    # The tokenizer's vocabulary: every id the random LM picks is real text, so answers (and the context of later
    # turns) have their length.
    pipe = build_pipeline(tokenizer, opt_125m_shaped(len(tokenizer), tiny=args.tiny))
    # Answers of a fixed length (no EOS or images from the random LM) make every mode do the same work.
    settings = dict(max_new_tokens=args.answer_tokens, max_images=0)
    pipe.llm.generation_config.eos_token_id = None
    medians, context, reused = measure(pipe, settings, args.repeats)

    first_reused, total_reused = medians["reused"]
    lines = [
        "# Multi-turn dialogue: turn 8 with the cache reused vs recomputed",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, CPU, fp32; median of {args.repeats} alternating runs after a warm-up. "
        "Command: `python -m benchmarks.bench_conversation`.",
        "",
        f"Random-weight LM of OPT-125m shape behind a ChatML template; turns 1-7 give {context} cached positions, of "
        f"which turn 8 reuses {reused}; each answer is {args.answer_tokens} tokens, greedy, batch 1. The three ways "
        "give the same answer (checked).",
        "",
        "| turn 8 | first token (s) | whole turn (s) | first token vs reused | whole turn vs reused |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in ("reused", "recomputed", "no cache"):
        first, total = medians[mode]
        lines.append(
            f"| {mode} | {first:.3f} | {total:.3f} | {first / first_reused:.2f}x | {total / total_reused:.2f}x |"
        )
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"Wrote {args.output}")
    return medians


if __name__ == "__main__":
    main()

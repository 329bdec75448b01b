"""How many learned queries GILL's mapper should use against a decoder's conditioning length (issue 10, section 1).

    python benchmarks/gpu/mapper_queries.py            # real mapper sizes, on a GPU if there is one, else the CPU
    python benchmarks/gpu/mapper_queries.py --tiny     # tiny sizes, seconds (the tests run this)

For each decoder family's real layout (`REAL_LAYOUTS`, as read from the real architectures by `read_conditioning_layout`
in tests/test_bench_gpu.py) and an OPT-6.7B LM (hidden 4096, r = 8 [IMG] tokens), it builds the mapper with one query
per output position and with 77 queries spread over the positions by a learned linear map (`num_queries`), counts
its parameters on the meta device, and times one training step (forward, MSE backward, no optimizer) at a batch of
`--batch`.
"""

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)) + "/src"]

from gill_pipeline.constants import (  # noqa: E402
    DEFAULT_MAPPER_DECODER_LAYERS,
    DEFAULT_MAPPER_ENCODER_LAYERS,
    DEFAULT_MAPPER_HEADS,
    DEFAULT_MAPPER_WIDTH,
    DEFAULT_NUM_IMG_TOKENS,
)
from gill_pipeline.models.mapper import GILLMapper  # noqa: E402

# (sequence length, width, pooled width or None), per prompt, read from the real architectures.
REAL_LAYOUTS = {
    "SD 1.5": (77, 768, None),
    "SDXL": (77, 2048, 1280),
    "SD3.5": (333, 4096, 2048),
    "Flux.1": (512, 4096, 768),
    "PixArt-Sigma": (300, 4096, None),
    "Sana": (300, 2304, None),
}
OPT_6_7B_HIDDEN = 4096
FEW_QUERIES = 77  # the reference GILL's query count (SD's text length)


def mapper(in_dim, length, width, pooled, queries, sizes, device="cpu"):
    with torch.device(device):
        return GILLMapper(
            in_dim=in_dim, out_dim=width, num_output_tokens=length, pooled_out_dim=pooled,
            num_queries=None if queries == length else queries, **sizes,
        )


def step_ms(model, in_dim, r, batch, device, repeats) -> float:
    hidden = torch.randn(batch, r, in_dim, device=device)
    embeds = torch.randn(batch, r, in_dim, device=device)

    def step():
        sequence, pooled = model.map(hidden, embeds)
        loss = sequence.pow(2).mean() + (pooled.pow(2).mean() if pooled is not None else 0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny mapper and LM widths (seconds).")
    parser.add_argument("--batch", type=int, default=None, help="Batch of the timed step (default 8; 2 with --tiny).")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        sizes = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2)
        in_dim, r, scale, batch = 32, 4, 16, args.batch or 2
    else:
        sizes = dict(hidden_dim=DEFAULT_MAPPER_WIDTH, num_encoder_layers=DEFAULT_MAPPER_ENCODER_LAYERS,
                     num_decoder_layers=DEFAULT_MAPPER_DECODER_LAYERS, num_heads=DEFAULT_MAPPER_HEADS)
        in_dim, r, scale, batch = OPT_6_7B_HIDDEN, DEFAULT_NUM_IMG_TOKENS, 1, args.batch or 8
    rows = []
    torch.manual_seed(0)
    for name, (length, width, pooled) in REAL_LAYOUTS.items():
        length, width = max(length // scale, 2), max(width // scale, 2)
        pooled = max(pooled // scale, 2) if pooled else None
        few = max(FEW_QUERIES // scale, 1)
        for queries in sorted({length, min(few, length)}, reverse=True):
            params = sum(p.numel() for p in mapper(in_dim, length, width, pooled, queries, sizes, "meta").parameters())
            model = mapper(in_dim, length, width, pooled, queries, sizes, device)
            rows.append((name, length, width, pooled, queries, params, step_ms(model, in_dim, r, batch, device,
                                                                               args.repeats)))
            del model
    print(f"Mapper sizes {sizes}, LM hidden {in_dim}, r={r}, batch {batch}, device {device}, fp32; median of "
          f"{args.repeats} steps (forward + backward).\n")
    print("| decoder | length x width (+ pooled) | queries | parameters | step (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, length, width, pooled, queries, params, ms in rows:
        shape = f"{length} x {width}" + (f" + {pooled}" if pooled else "")
        print(f"| {name} | {shape} | {queries} | {params / 1e6:.2f}M | {ms:.1f} |")
    return rows


if __name__ == "__main__":
    main()

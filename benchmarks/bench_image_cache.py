"""Data loading with and without `--cache-images` (training/data.py ExampleReader), side by side in one run.

A small image set read for several epochs (as the shapes world's GILL training reads its 4000 caption pairs ~30
times) is decoded and preprocessed once per file with the cache, every time without it. Both readers return the same
tensors (checked here). The two variants alternate, so the machine's noise hits both alike:

    python -m benchmarks.bench_image_cache          # writes benchmarks/results/image_cache.md
"""

import argparse
import os
import platform
import random
import statistics
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="image files in the set")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the set per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per variant")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "image_cache.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from training.data import ExampleReader
    from training.shapes.pretrain_base import processor
    from training.shapes.world import all_scenes, draw

    image_processor = processor(32)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.images):
            path = os.path.join(folder, f"{i:05d}.png")
            draw(rng.choice(all_scenes()), 32, 1, rng.randrange(1 << 30)).save(path)
            paths.append(path)

        def run(cache: int) -> tuple[float, list]:
            reader = ExampleReader(image_processor, cache_images=cache)
            order = random.Random(1)
            start = time.perf_counter()
            for _ in range(args.epochs):
                shuffled = paths[:]
                order.shuffle(shuffled)
                last = [reader(os.path.basename(p), "", p)["pixel_values"] for p in shuffled]
            return time.perf_counter() - start, last

        times = {"off": [], "on": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, cache in (("off", 0), ("on", args.images)):
                seconds, last = run(cache)
                times[name].append(seconds)
                outputs[name] = last
        same = all(torch.equal(a, b) for a, b in zip(outputs["off"], outputs["on"]))

    reads = args.images * args.epochs
    rate = {k: reads / statistics.median(v) for k, v in times.items()}
    ratio = rate["on"] / rate["off"]
    lines = [
        "# Training data loading: `--cache-images` on vs off",
        "",
        f"Command: `python -m benchmarks.bench_image_cache --images {args.images} --epochs {args.epochs} --repeats "
        f"{args.repeats}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, one torch thread; shapes-world PNGs (32x32) read by "
        "training/data.py's ExampleReader with the world's CLIP preprocessing.",
        "",
        "| cache | images read per s (median of the alternating runs) |",
        "| --- | --- |",
        f"| off | {rate['off']:.0f} |",
        f"| on (every file) | {rate['on']:.0f} |",
        "",
        f"**Ratio on / off: {ratio:.1f}x** over {args.epochs} epochs (the first epoch decodes every file either way). "
        f"Same tensors from both readers: {same}. Raw seconds: {times}.",
        "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return {"ratio": ratio, "same": same}


if __name__ == "__main__":
    main()

"""Precompute the generation targets (the decoder's text conditioning of the captions) and, optionally, the frozen
vision encoder's image features, into safetensors shards that later runs read instead of running those encoders.

    python -m training.precompute --data /data/cc3m/train.tsv --image-folder /data/cc3m/images \
        --stable-diffusion stable-diffusion-v1-5/stable-diffusion-v1-5 --output /data/cc3m/targets-sd15

`--stable-diffusion` may name a checkpoint of any supported decoder family (SDXL, SD3, Flux, PixArt-Sigma, Sana):
the targets are then what that family's own `encode_prompt` returns (sequence, pooled vector, mask), stored per
tensor, with the decoder's conditioning layout in `index.json`. Disk cost per family: docs/decoders.md.

A run given `--train-targets FOLDER` checks the stored fingerprint of the text encoder and tokenizer (and of the
vision encoder, for image features) against its own models and refuses targets made with others.
Storage: one caption costs `cond_length * cond_width` values (77 x 768 for SD 1.x: 118 KB in float16), plus the
pooled width for SDXL/SD3/Flux and one byte per position for the masks of PixArt/Sana.
"""

import argparse
import json
import logging
import os
import sys

import torch
from safetensors.torch import save_file

from gill_pipeline.models.vision import image_pixel_values, pooled_image_features
from gill_pipeline.testing import TINY_DECODER_BUILDERS

from training.data import iterate_records, load_rgb, resolve_image_path
from training.records import RowProblems, unique_records
from training.params import DATA_TYPES, TINY_LM_TYPES
from training.targets import (
    FEATURES_KEY,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_TEMPLATE,
    TARGET_KEY,
    TENSOR_KEY_PREFIX,
    UNCOND_FILE,
    decoder_fingerprint,
    encode_captions,
    encode_family_targets,
    module_fingerprint,
    tokenizer_fingerprint,
)

logger = logging.getLogger("precompute")
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def precompute_targets(
    records,
    text_encoder,
    tokenizer,
    output_dir: str,
    cond_length: int,
    image_encoder=None,
    image_processor=None,
    batch_size: int = 64,
    shard_size: int = 10000,
    dtype: torch.dtype = torch.float16,
    decoder=None,
) -> dict:
    """Writes shards of targets for `records` ((key, caption, image path or PIL image) triples) to `output_dir`.

    `decoder`: a decoder pipeline of another family than SD 1.x/2.x, with its text encoders; its own `encode_prompt`
    makes the targets (`text_encoder`, `tokenizer` and `cond_length` are then unused, pass None).

    With `image_encoder`, the pooled image features are stored too, and unreadable images are skipped (counted);
    without it, images are not opened at all. `index.json` is written last, so a half-written folder is unusable.
    """
    os.makedirs(output_dir, exist_ok=True)
    index_path = os.path.join(output_dir, INDEX_FILE)
    if os.path.exists(index_path):
        os.remove(index_path)
    shards, pending, skipped = [], [], 0
    target_shape = None
    layout = None
    if decoder is not None:
        from gill_pipeline.decoders import read_conditioning_layout

        layout = read_conditioning_layout(decoder)
    else:
        text_encoder.eval()

    def stored(name, value):
        # Masks as one byte per position; embeddings in the storage dtype.
        return value.to(torch.uint8) if name.endswith("attention_mask") else value.to(dtype)

    def flush(count):
        nonlocal pending, target_shape
        chunk, pending = pending[:count], pending[count:]
        if not chunk:
            return
        keys = [p[0] for p in chunk]
        if layout is not None:
            tensors = {
                TENSOR_KEY_PREFIX + name: stored(name, torch.cat([p[1][name] for p in chunk])).contiguous()
                for name in layout.names
            }
            target_shape = list(tensors[TENSOR_KEY_PREFIX + "prompt_embeds"].shape[1:])
        else:
            tensors = {TARGET_KEY: torch.cat([p[1] for p in chunk]).to(dtype).contiguous()}
            target_shape = list(tensors[TARGET_KEY].shape[1:])
        if image_encoder is not None:
            tensors[FEATURES_KEY] = torch.cat([p[2] for p in chunk]).float().contiguous()
        name = SHARD_TEMPLATE.format(index=len(shards))
        save_file(tensors, os.path.join(output_dir, name))
        shards.append({"file": name, "keys": keys})

    batch = []

    def encode(batch):
        nonlocal skipped
        images, kept = [], []
        for key, caption, source in batch:
            if image_encoder is not None:
                image = source if not isinstance(source, (str, bytes)) else load_rgb(
                    resolve_image_path(source) if isinstance(source, str) else source
                )
                if image is None:
                    skipped += 1
                    logger.warning("Skipping %r: the image is missing or unreadable.", key)
                    continue
                images.append(image)
            kept.append((key, caption))
        if not kept:
            return
        captions = [c for _, c in kept]
        if layout is not None:
            encoded = {k: v.cpu() for k, v in encode_family_targets(decoder, captions).items()}
            targets = [{k: v[row : row + 1] for k, v in encoded.items()} for row in range(len(kept))]
        else:
            encoded = encode_captions(text_encoder, tokenizer, captions, cond_length).float().cpu()
            targets = [encoded[row : row + 1] for row in range(len(kept))]
        features = None
        if image_encoder is not None:
            pixels = image_pixel_values(image_processor, images)
            features = pooled_image_features(image_encoder, pixels).float().cpu()
        for row, (key, _) in enumerate(kept):
            pending.append((key, targets[row], None if features is None else features[row : row + 1]))

    for record in unique_records(records, "the data set"):
        batch.append(record)
        if len(batch) == batch_size:
            encode(batch)
            batch = []
        while len(pending) >= shard_size:
            flush(shard_size)
    encode(batch)
    while pending:
        flush(shard_size)

    if layout is not None:
        from gill_pipeline.decoders import default_negative_conditioning

        negatives = default_negative_conditioning(decoder)
        uncond_tensors = {TENSOR_KEY_PREFIX + k: v.float().cpu().contiguous() for k, v in negatives.items()}
        # A family without negatives (Flux) still gets a file: safetensors cannot hold zero tensors, so a marker.
        save_file(uncond_tensors or {"none": torch.zeros(1)}, os.path.join(output_dir, UNCOND_FILE))
        fingerprint = {"decoder": decoder_fingerprint(decoder)}
        uncond_shape = list(layout.tensor("prompt_embeds").shape)
    else:
        uncond = encode_captions(text_encoder, tokenizer, [""], cond_length).float().cpu()
        save_file({TARGET_KEY: uncond.contiguous()}, os.path.join(output_dir, UNCOND_FILE))
        fingerprint = {"text_encoder": module_fingerprint(text_encoder), "tokenizer": tokenizer_fingerprint(tokenizer)}
        uncond_shape = list(uncond.shape[1:])
    if image_encoder is not None:
        fingerprint["image_encoder"] = module_fingerprint(image_encoder)
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "target_shape": target_shape or uncond_shape,
        "layout": layout.to_dict() if layout is not None else None,
        "has_image_features": image_encoder is not None,
        "count": sum(len(s["keys"]) for s in shards),
        "skipped": skipped,
        "shards": shards,
    }
    tmp = index_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.replace(tmp, index_path)
    logger.info("Wrote %d targets in %d shards to %s (%d images skipped).", index["count"], len(shards), output_dir, skipped)
    return {"count": index["count"], "skipped": skipped, "shards": len(shards)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="TSV file, image folder or webdataset shards (None for synthetic).")
    parser.add_argument("--data-type", default="auto", choices=DATA_TYPES)
    parser.add_argument("--image-folder", default=None, help="Folder the TSV's image paths are relative to.")
    parser.add_argument("--synthetic-size", type=int, default=64, help="Examples of the synthetic set.")
    parser.add_argument("--synthetic-seed", type=int, default=0, help="Seed of the synthetic set (training uses `seed`, "
                        "validation `seed + 1`).")
    parser.add_argument("--stable-diffusion", default=None, help="SD checkpoint id or path (its text encoder).")
    parser.add_argument("--tiny-random", default=None, choices=TINY_LM_TYPES, help="Use the tiny random models.")
    parser.add_argument("--tiny-decoder", default="sd", choices=sorted(TINY_DECODER_BUILDERS),
                        help="Decoder family of the tiny random models (with --tiny-random).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny random models.")
    parser.add_argument("--image-features", action="store_true", help="Also store the vision encoder's features.")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP vision encoder id or path, or a saved GILL pipeline folder (with --image-features).")
    parser.add_argument("--cond-length", type=int, default=None, help="Target length (default: the SD tokenizer's).")
    parser.add_argument("--output", required=True, help="Output folder.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10000, help="Examples per safetensors shard.")
    parser.add_argument("--dtype", default="float16", choices=sorted(STORE_DTYPES), help="Storage dtype of targets.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_image_encoder(source: str):
    """A CLIP vision encoder and its image processor, from a CLIP checkpoint (id or folder) or from a saved GILL
    pipeline folder (its `image_encoder` and `feature_extractor`: the features are then exactly the pipeline's)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    if os.path.isfile(os.path.join(source, "model_index.json")):
        for sub in ("image_encoder", "feature_extractor"):
            if not os.path.isdir(os.path.join(source, sub)):
                raise ValueError(f"`--image-encoder`={source!r} is a pipeline folder without a {sub!r} folder.")
        return (CLIPVisionModel.from_pretrained(source, subfolder="image_encoder"),
                CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor"))
    return CLIPVisionModel.from_pretrained(source), CLIPImageProcessor.from_pretrained(source)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if (args.stable_diffusion is None) == (args.tiny_random is None):
        raise ValueError(
            f"Give exactly one of `--stable-diffusion` or `--tiny-random`, got {args.stable_diffusion!r} and "
            f"{args.tiny_random!r}."
        )
    image_encoder = image_processor = decoder = None
    if args.tiny_random:
        from training.setup_models import build_tiny_models

        models = build_tiny_models(args.tiny_random, args.seed, decoder=args.tiny_decoder)
        text_encoder, tokenizer, decoder = models.text_encoder, models.text_tokenizer, models.decoder
        if args.image_features:
            image_encoder, image_processor = models.pipe.image_encoder, models.pipe.feature_extractor
        image_size = models.pipe.image_encoder.config.image_size
    else:
        from gill_pipeline.decoders.families import StableDiffusionFamily
        from training.setup_models import decoder_family_of, load_decoder_text_side, load_sd_text_encoder

        if isinstance(decoder_family_of(args.stable_diffusion), StableDiffusionFamily):
            text_encoder, tokenizer = load_sd_text_encoder(args.stable_diffusion)
        else:
            text_encoder = tokenizer = None
            decoder = load_decoder_text_side(args.stable_diffusion)
        if args.image_features:
            if args.image_encoder is None:
                raise ValueError("`--image-features` needs `--image-encoder` (the CLIP vision encoder of the pipeline).")
            image_encoder, image_processor = load_image_encoder(args.image_encoder)
        image_size = image_encoder.config.image_size if image_encoder is not None else 224
    if decoder is not None:
        if args.cond_length is not None:
            raise ValueError(f"`--cond-length`={args.cond_length} applies to Stable Diffusion 1.x/2.x only.")
        cond_length = None
        decoder.to(args.device)
    else:
        cond_length = args.cond_length or int(tokenizer.model_max_length)
        text_encoder.to(args.device)
    if image_encoder is not None:
        image_encoder.to(args.device).eval()
    problems = RowProblems()  # malformed rows are skipped (each logged with its file and line) and counted
    records = iterate_records(
        args.data, args.data_type, args.image_folder, args.synthetic_size, image_size, args.synthetic_seed, problems
    )
    summary = precompute_targets(
        records, text_encoder, tokenizer, args.output, cond_length, image_encoder, image_processor,
        args.batch_size, args.shard_size, STORE_DTYPES[args.dtype], decoder=decoder,
    )
    if problems:
        logger.warning("Skipped %d malformed rows of %s.", len(problems), args.data)
    return {**summary, "malformed_rows": len(problems)}


if __name__ == "__main__":
    main(sys.argv[1:])

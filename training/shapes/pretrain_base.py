"""Pretrains the shapes world's base models from scratch: CLIP, VAE, UNet (a real Stable Diffusion pipeline folder),
a causal LM, and the attribute classifier that judges images.

    python -m training.shapes.pretrain_base --out shapes_base            # the full setting (~20 min on 2 CPU cores)
    python -m training.shapes.pretrain_base --out /tmp/b --scale 0.02    # a few steps of every stage (tests)

The last stage sharpens CLIP's vision tower alone against its frozen text tower (which the UNet already reads).

Writes, under --out: `clip/` (CLIPModel + processor + tokenizer), `sd/` (StableDiffusionPipeline: vae, unet,
text_encoder = CLIP's text tower, tokenizer, scheduler), `lm/` (causal LM + tokenizer),
`classifier/` (attribute classifier), `pretrain_log.json` (losses, seconds per stage).
"""

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import train_classifier
from .dialogue import dialogue_corpus, drawing
from .models import SIZES, build_clip, build_lm, build_scheduler, build_tokenizer, build_unet, build_vae
from .train_world_gill import check_shares
from .world import all_scenes, corpus, training_scenes

logger = logging.getLogger("shapes.pretrain")


def image_tensor(images) -> torch.Tensor:
    """uint8 HWC arrays -> float NCHW in [-1, 1] (what the VAE and, with mean = std = 0.5, CLIP read)."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def world_images(scenes, seed: int, vary_rate: float = 0.0):
    """The world's drawings of `scenes` (jitter 1), `vary_rate` of them varied (`dialogue.drawing`), from one seed."""
    rng = random.Random(seed)
    return [drawing(s, rng, vary_rate, SIZES.image_size) for s in scenes]


def encode_texts(tokenizer, texts, length: int) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def cosine_lr(optimizer, step: int, total: int, base: float, warmup: int = 50) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for group in optimizer.param_groups:
        group["lr"] = lr


# -------------------------------------------------------------------------------------------------------------------
def contrastive_steps(clip, tokenizer, optimizer, steps: int, batch: int, lr: float, warmup: int, seed: int,
                      vary_rate: float = 0.0) -> list:
    """CLIP's contrastive loss on world images and captions (`vary_rate` of them drawn varied); returns the losses."""
    scenes = training_scenes()
    rng = random.Random(seed)
    losses = []
    clip.train()
    for step in range(steps):
        # Distinct scenes per batch: duplicate captions would be false negatives for the contrastive loss.
        chosen = rng.sample(scenes, min(batch, len(scenes)))
        pixels = image_tensor(world_images(chosen, rng.randrange(1 << 30), vary_rate))
        ids = encode_texts(tokenizer, [s.caption() for s in chosen], SIZES.text_length)
        cosine_lr(optimizer, step, steps, lr, warmup=warmup)
        mask = (ids != tokenizer.pad_token_id).long()
        loss = clip(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    clip.eval()
    return losses


def train_clip(tokenizer, steps: int, batch: int, seed: int) -> tuple:
    torch.manual_seed(seed)
    clip = build_clip(tokenizer)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=5e-4, weight_decay=0.05)
    return clip, contrastive_steps(clip, tokenizer, optimizer, steps, batch, 5e-4, 50, seed)


def refine_clip_vision(clip, tokenizer, steps: int, batch: int, seed: int, vary_rate: float = 0.0) -> tuple:
    """More contrastive steps for the vision tower alone, against the frozen text tower: sharper shape features for
    GILL (which reads the vision tower), while the text tower - the SD text encoder the UNet was trained on - stays
    bit-identical. `vary_rate` of the images are varied drawings, so that a user's own drawing of a shape (a little
    smaller, off-centre, on another background) reads as the world's."""
    torch.manual_seed(seed)
    clip.requires_grad_(False)
    trainable = list(clip.vision_model.parameters()) + list(clip.visual_projection.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.05)
    losses = contrastive_steps(clip, tokenizer, optimizer, steps, batch, 3e-4, 20, seed, vary_rate)
    return clip.requires_grad_(False), losses


def train_vae(steps: int, batch: int, seed: int) -> tuple:
    torch.manual_seed(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    rng = random.Random(seed + 1)
    scenes = all_scenes(include_held_out=False)
    losses = []
    vae.train()
    for step in range(steps):
        x = image_tensor(world_images([rng.choice(scenes) for _ in range(batch)], rng.randrange(1 << 30)))
        cosine_lr(optimizer, step, steps, 1e-3)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # The shapes cover few pixels: weight them ~9x so colours are learnt (shared/facts/shapes-world.md).
        foreground = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
        weight = 1 + 8 * foreground
        loss = (weight * (recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        sample = image_tensor(world_images(training_scenes(), seed + 2))
        latents = vae.encode(sample).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, losses


def train_unet(vae, text_encoder, tokenizer, steps: int, batch: int, seed: int, images_per_scene: int = 12) -> tuple:
    torch.manual_seed(seed)
    scheduler = build_scheduler()
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)

    # Precompute latents and caption states once (the frozen VAE and text encoder never change).
    scenes = [s for s in training_scenes() for _ in range(images_per_scene)]
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(image_tensor(world_images(scenes[i : i + 256], seed + i))).latent_dist.mean
                for i in range(0, len(scenes), 256)
            ]
        ) * vae.config.scaling_factor
        captions = sorted({s.caption() for s in scenes})
        states = text_encoder(encode_texts(tokenizer, captions + [""], SIZES.text_length))[0]
    caption_index = torch.tensor([captions.index(s.caption()) for s in scenes])
    empty = states[-1:]

    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(scenes), (batch,), generator=generator)
        x0 = latents[idx]
        cond = states[caption_index[idx]].clone()
        drop = torch.rand(batch, generator=generator) < 0.1  # 10% empty captions, for classifier-free guidance
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cosine_lr(optimizer, step, steps, 1e-3)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
    return ema.eval(), scheduler, losses


def train_lm(tokenizer, steps: int, batch: int, seed: int, phrasings: str = "world", dialogues: int = 0,
             sizes=SIZES) -> tuple:
    """The world's causal LM on its corpus (captions and context chains); with `dialogues`, every fourth step is a
    half batch of that many chat transcripts in words (`dialogue.dialogue_corpus`: a start scene, then requests and
    answers as a chat writes them). Transcripts are 3-4 times longer than the corpus' lines: kept in batches of their
    own, they do not pad every batch to their length (the stage stays about as fast as without them)."""
    torch.manual_seed(seed)
    lm = build_lm(tokenizer, sizes)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=2e-3, weight_decay=0.01)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(lines):
        return [[bos] + tokenizer(line, add_special_tokens=False).input_ids + [eos] for line in lines]

    encoded, transcripts = encode(corpus(20000, seed, phrasings)), encode(dialogue_corpus(dialogues, seed + 7))
    rng = random.Random(seed)
    losses = []
    lm.train()
    for step in range(steps):
        if transcripts and step % 4 == 3:
            rows = [rng.choice(transcripts) for _ in range(max(2, batch // 2))]
        else:
            rows = [rng.choice(encoded) for _ in range(batch)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        cosine_lr(optimizer, step, steps, 2e-3)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 200 == 0:
            logger.info("lm step %d/%d loss %.3f", step, steps, loss.item())
    return lm.eval(), losses


# -------------------------------------------------------------------------------------------------------------------
def save_clip(clip, tokenizer, out: str) -> None:
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor(SIZES.image_size).save_pretrained(out)


def processor(image_size: int):
    """CLIP preprocessing for the world: no resize beyond the native size, pixels mapped to [-1, 1]."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's number of steps")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiplies every stage's batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stages", default="clip,vae,unet,lm,classifier,clip_vision", help="comma-separated subset to run"
    )
    parser.add_argument(
        "--clip-vision-rounds", type=int, default=1,
        help="rounds of 400 vision-tower refinement steps in the clip_vision stage (each with a fresh optimiser)",
    )
    parser.add_argument(
        "--vary-clip-images", type=float, default=0.0,
        help="share of the clip_vision stage's images drawn varied (dialogue.draw_varied; 0: the world's drawings)",
    )
    parser.add_argument(
        "--phrasings", default="world", choices=("world", "training"),
        help="instruction wordings of the LM's context chains (world.TRAINING_PHRASINGS; held-out ones never)",
    )
    parser.add_argument(
        "--dialogue-corpus", type=int, default=0,
        help="chat transcripts added to the LM's corpus, and the chat words in its vocabulary (0: neither)",
    )
    args = parser.parse_args(argv)
    if args.dialogue_corpus < 0:
        parser.error(f"--dialogue-corpus must be 0 or more, got {args.dialogue_corpus}")
    check_shares(parser, args, ("vary_clip_images",))
    if args.clip_vision_rounds < 1:
        parser.error(f"--clip-vision-rounds must be at least 1 (leave clip_vision out of --stages instead), got "
                     f"{args.clip_vision_rounds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stages = set(args.stages.split(","))
    steps = lambda n: max(2, int(n * args.scale))  # noqa: E731
    batch = lambda n: max(4, int(n * args.batch_scale))  # noqa: E731
    log_path = os.path.join(args.out, "pretrain_log.json")
    log = json.load(open(log_path)) if os.path.exists(log_path) else {}

    clip_tokenizer = build_tokenizer(clip_style=True, model_max_length=SIZES.text_length)
    dialogue = args.dialogue_corpus > 0
    lm_sizes = dataclasses.replace(SIZES, lm_context=SIZES.dialogue_lm_context) if dialogue else SIZES
    lm_tokenizer = build_tokenizer(clip_style=False, model_max_length=lm_sizes.lm_context, chat_words=dialogue)

    def stage(name, fn):
        start = time.time()
        result = fn()
        log[name] = {"seconds": round(time.time() - start, 1), **result}
        logger.info("%s: %s", name, log[name])
        with open(log_path, "w") as f:
            json.dump(log, f, indent=2)

    def do_clip():
        clip, losses = train_clip(clip_tokenizer, steps(300), batch(128), args.seed)
        save_clip(clip, clip_tokenizer, os.path.join(args.out, "clip"))
        return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}

    def do_vae():
        # 1500 steps: at 400 the VAE lost small shapes (drawn images through it and back were 0.86 exact by the
        # classifier, small squares 0.53), a ceiling on every image SD or GILL draws; at 1500 they come back 1.00.
        vae, losses = train_vae(steps(1500), batch(32), args.seed)
        vae.save_pretrained(os.path.join(args.out, "vae"))
        return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}

    def do_unet():
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(os.path.join(args.out, "clip")).eval()
        # 2500 steps on the 1500-step VAE draw captions 0.99-1.00 exact (3500 on the 400-step VAE: 0.93 / 0.81)
        vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae")).eval()
        unet, scheduler, losses = train_unet(
            vae, clip.text_model, clip_tokenizer, steps(2500), batch(64), args.seed,
            images_per_scene=max(1, round(12 * min(1.0, args.batch_scale))),
        )
        sd = StableDiffusionPipeline(
            vae=vae, text_encoder=clip.text_model, tokenizer=clip_tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        sd.save_pretrained(os.path.join(args.out, "sd"))
        return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-50:]))}

    def do_lm():
        lm, losses = train_lm(lm_tokenizer, steps(1200), batch(64), args.seed, args.phrasings, args.dialogue_corpus,
                             lm_sizes)
        lm.save_pretrained(os.path.join(args.out, "lm"))
        lm_tokenizer.save_pretrained(os.path.join(args.out, "lm"))
        return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}

    def do_clip_vision():
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(os.path.join(args.out, "clip"))
        rounds = []
        for r in range(args.clip_vision_rounds):  # each round: a fresh optimiser and schedule, its own seed
            clip, losses = refine_clip_vision(clip, clip_tokenizer, steps(400), batch(128), args.seed + r + 11,
                                              args.vary_clip_images)
            rounds.append({"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))})
        save_clip(clip, clip_tokenizer, os.path.join(args.out, "clip"))
        return {"rounds": rounds, "first_loss": rounds[0]["first_loss"], "last_loss": rounds[-1]["last_loss"]}

    def do_classifier():
        classifier, accuracy = train_classifier(steps(600), batch(64), args.seed)
        classifier.save_pretrained(os.path.join(args.out, "classifier"))
        return {"held_out_image_accuracy": accuracy}

    stages_in_order = (
        ("clip", do_clip), ("vae", do_vae), ("unet", do_unet), ("lm", do_lm), ("classifier", do_classifier),
        ("clip_vision", do_clip_vision),
    )
    for name, fn in stages_in_order:
        if name in stages:
            stage(name, fn)
    return log


if __name__ == "__main__":
    main()

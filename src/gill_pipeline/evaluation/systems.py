"""The systems an evaluation compares: GILL (through the pipeline's own steps) and its baselines.

GILL is asked for an image right after the input, as in the paper's evaluations: `[IMG0]` is forced as the first
new token (`FORCE_IMAGE`), so the image (or retrieval query) comes from what the LM read and not from text it wrote.
The generation baseline is the decoder alone: a stock `StableDiffusionPipeline` over the GILL pipeline's own UNet,
VAE and scheduler, with the text encoder and tokenizer the user passes (for the shapes world, the world's own SD).
The retrieval baseline is a whole CLIP the user passes.
"""

import math
import os

import PIL.Image
import torch

from ..pipeline.decoding import DecodingSettings
from ..pipeline.inputs import seeded_generator


# One new token, which must be [IMG0] (its logit scaled far above every other), and one image group.
FORCE_IMAGE = dict(max_new_tokens=1, img_logit_scale=math.inf, max_images=1)


def example_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per example, so an example's image does not depend on the batch it ran in (resumable runs)."""
    return [seeded_generator(s, "seed") for s in seeds]


class GILLSystem:
    r"""
    GILL's answers to the questions of the paper's protocols, for a loaded [`GILLPipeline`].

    Args:
        pipe ([`GILLPipeline`]): the pipeline. No retrieval index is needed: retrieval and the decision read GILL's
            heads directly, and generation never retrieves.
        num_inference_steps (`int`), guidance_scale (`float`): the decoder's sampling settings.
    """

    name = "gill"

    def __init__(self, pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5):
        self.pipe = pipe
        self.sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @torch.no_grad()
    def img_hidden_states(self, inputs: list[list]) -> torch.Tensor:
        """`(N, r, D)`: the LM's last-layer states at the forced `[IMG]` group after each interleaved input."""
        pipe = self.pipe
        embeds = [pipe.encode_interleaved(x, self.device, f"inputs[{i}]") for i, x in enumerate(inputs)]
        rows = pipe.decode(embeds, DecodingSettings(**FORCE_IMAGE))
        for i, row in enumerate(rows):
            if not row.img_starts:  # cannot happen unless the LM's context is full
                raise ValueError(f"`inputs[{i}]` left no room for an [IMG] group in the LM's context; shorten it.")
        return torch.stack([row.img_hidden_states(0, pipe.num_img_tokens) for row in rows])

    @torch.no_grad()
    def text_embeds(self, inputs: list[list]) -> torch.Tensor:
        """Normalised retrieval embeddings `(N, E)` of interleaved inputs (the text side of GILL's retrieval)."""
        return self.pipe.gill.text_retrieval_embeds(self.img_hidden_states(inputs)[:, 0]).float().cpu()

    @torch.no_grad()
    def image_embeds(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """Normalised retrieval embeddings `(N, E)` of images (the image side of GILL's retrieval)."""
        features = self.pipe.encode_image_features(images, self.device)
        return self.pipe.gill.image_retrieval_embeds(features).float().cpu()

    @torch.no_grad()
    def decision_probs(self, inputs: list[list]) -> torch.Tensor:
        """`(N, 2)` probabilities of (generate, retrieve) from the decision head at the forced `[IMG0]`."""
        return self.pipe.gill.decide(self.img_hidden_states(inputs)[:, 0]).float().cpu()

    @torch.no_grad()
    def generate(self, inputs: list[list], seeds: list[int]) -> list[PIL.Image.Image]:
        """One generated image per interleaved input (the mapper and the decoder; never retrieval)."""
        output = self.pipe(
            inputs, image_mode="generate", generator=example_generators(seeds), output_type="pil", **FORCE_IMAGE,
            **self.sampling,
        )
        images = []
        for i, found in enumerate(output.gill_images):
            if not found:
                raise ValueError(f"GILL produced no image for `inputs[{i}]`: {output.warnings[i]}")
            images.append(found[0].image)
        return images


class DecoderBaseline:
    r"""
    The decoder alone given the same text: the stock `StableDiffusionPipeline` over GILL's UNet, VAE and scheduler
    with a CLIP text encoder and tokenizer passed by the user. Images in the context are not seen (the decoder reads
    text only); text longer than the tokenizer's limit is cut, as `StableDiffusionPipeline` does.
    """

    name = "sd"

    def __init__(self, sd_pipeline, num_inference_steps: int = 50, guidance_scale: float = 7.5):
        self.sd = sd_pipeline
        self.sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    @classmethod
    def from_gill_pipeline(cls, pipe, text_encoder, tokenizer, **sampling) -> "DecoderBaseline":
        from diffusers import StableDiffusionPipeline

        if pipe.unet is None or pipe.vae is None or pipe.scheduler is None:
            raise ValueError("The GILL pipeline has no decoder (`unet`, `vae`, `scheduler`), so it has no decoder baseline.")
        width = pipe.unet.config.cross_attention_dim
        if text_encoder.config.hidden_size != width:
            raise ValueError(
                f"The text encoder gives {text_encoder.config.hidden_size}-wide states but the UNet reads {width}: "
                "pass the text encoder of the Stable Diffusion checkpoint GILL decodes through."
            )
        sd = StableDiffusionPipeline(
            # The text encoder computes in the UNet's dtype (a pipeline loads in the dtype it was saved in).
            vae=pipe.vae, text_encoder=text_encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype),
            tokenizer=tokenizer, unet=pipe.unet,
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        sd.set_progress_bar_config(disable=True)
        return cls(sd, **sampling)

    @classmethod
    def from_text_encoder_path(cls, pipe, path: str, dtype: torch.dtype = torch.float32, **sampling) -> "DecoderBaseline":
        """`path`: a Stable Diffusion folder (with `text_encoder/` and `tokenizer/`), or a folder holding a CLIP text
        encoder (or a whole CLIP) and its tokenizer."""
        from transformers import AutoTokenizer, CLIPTextModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"The text encoder folder {path!r} does not exist (pass a local folder).")
        if os.path.isdir(os.path.join(path, "text_encoder")):
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        else:
            text_encoder = CLIPTextModel.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls.from_gill_pipeline(pipe, text_encoder.eval(), tokenizer, **sampling)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[PIL.Image.Image]:
        return self.sd(prompts, generator=example_generators(seeds), output_type="pil", **self.sampling).images


class CLIPRetrievalBaseline:
    """Retrieval by a whole CLIP (text tower vs image tower), as the paper's CLIP rows; text past the CLIP's limit is
    cut."""

    name = "clip"

    def __init__(self, scorer):
        self.scorer = scorer

    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(self.scorer.text_embeds(texts), dim=-1).cpu()

    def image_embeds(self, images) -> torch.Tensor:
        return torch.nn.functional.normalize(self.scorer.image_embeds(images), dim=-1).cpu()


def make_baseline(pipe, baseline_text_encoder, sampling: dict) -> DecoderBaseline | None:
    """The decoder baseline from a folder path or a `(text_encoder, tokenizer)` pair; `None` for none."""
    if baseline_text_encoder is None:
        return None
    if isinstance(baseline_text_encoder, (str, os.PathLike)):
        return DecoderBaseline.from_text_encoder_path(pipe, str(baseline_text_encoder), **sampling)
    text_encoder, tokenizer = baseline_text_encoder
    return DecoderBaseline.from_gill_pipeline(pipe, text_encoder, tokenizer, **sampling)

"""The decoder bridge: GILL's `[IMG]` states -> images, through the decoder family's stock diffusers pipeline.

The stock pipeline (`StableDiffusionPipeline`, `FluxPipeline`, ...) is built over the GILL pipeline's own decoder
modules, text side None, ONCE per call (`GILLPipeline.__call__` builds it and passes it down to the checks, the
default size and the denoising loop).
"""

import inspect
from typing import Callable

import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..decoders.layout import GUIDANCE_CFG
from ..decoders import build_decoder_pipeline, family_for_pipeline, run_decoder
from ..decoders.fit import check_decoder_modules, decoder_size_multiple, vae_scale_factor
from .inputs import check_int, check_number, is_number
from .pipeline_output import GILLImage


# GILL's diffusers-style generation options -> the name each family's `__call__` gives them.
DECODER_OPTION_NAMES = {
    "timesteps": ("timesteps",),
    "sigmas": ("sigmas",),
    "eta": ("eta",),
    "guidance_rescale": ("guidance_rescale",),
    "cross_attention_kwargs": ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"),
}


def expand_generators(generator, owners: list[int], num_images_per_prompt: int):
    """One generator per input -> one per generated image row (rows of the same input share it, in order)."""
    if not isinstance(generator, list):
        return generator
    return [generator[b] for b in owners for _ in range(num_images_per_prompt)]


class ImageGenerationMixin:
    """Generation with the pipeline's decoder modules (`unet` or `transformer`, `vae`, `scheduler`)."""

    _DECODER_OPTION_NAMES = DECODER_OPTION_NAMES

    # What diffusers' callbacks read and write (e.g. `SDCFGCutoffCallback` sets `pipe._guidance_scale = 0.0`);
    # the denoising loop of the decoder pipeline is kept in step with them after every callback.
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        # Guidance-distilled (Flux-dev: an embedding) and timestep-distilled (Flux-schnell) decoders run no CFG pass.
        if self.gill.conditioning_layout.guidance != GUIDANCE_CFG:
            return False
        time_cond = self.unet.config.get("time_cond_proj_dim") if self.unet is not None else None
        return self._guidance_scale > 1 and time_cond is None

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) image generation."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to stop the current denoising loop early."""
        return self._interrupt

    @property
    def denoiser_name(self) -> str | None:
        """`"unet"` (Stable Diffusion 1.x/2.x, SDXL) or `"transformer"` (SD3, Flux, PixArt-Sigma, Sana): the
        component that denoises; None without one."""
        if getattr(self, "unet", None) is not None:
            return "unet"
        return "transformer" if getattr(self, "transformer", None) is not None else None

    @property
    def decoder_denoiser_name(self) -> str:
        """The denoiser component the learned weights' decoder family has (`"unet"` or `"transformer"`), whether
        or not it is loaded: what an error about a missing decoder names."""
        return family_for_pipeline(self.gill.conditioning_layout.pipeline_class).denoiser

    @property
    def can_generate(self) -> bool:
        """Whether the pipeline has the decoder modules needed to generate images."""
        return self.denoiser_name is not None and self.vae is not None and self.scheduler is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent of the pipeline's current `vae` (read again after `pipe.vae = ...`); 8 without one."""
        return vae_scale_factor(getattr(self, "vae", None), default=getattr(self, "_default_vae_scale_factor", 8))

    @vae_scale_factor.setter
    def vae_scale_factor(self, value: int):
        # `__init__` sets it as diffusers pipelines do; the VAE's own config wins whenever there is a VAE.
        self._default_vae_scale_factor = value

    @property
    def image_size_multiple(self) -> int:
        """Generated image sides must be multiples of this: one latent patch in pixels (the VAE scale factor times the
        denoiser's `patch_size`, times 2 for Flux, which packs 2x2 latents), and what the family's stock
        `check_inputs` asks (8; 32 for Sana)."""
        family = family_for_pipeline(self.gill.conditioning_layout.pipeline_class)
        denoiser = getattr(self, self.denoiser_name) if self.denoiser_name else None
        return decoder_size_multiple(family, denoiser, getattr(self, "vae", None))

    def check_decoder(self):
        """Raises a `ValueError` naming the component when the decoder modules (`unet`/`transformer`, `vae`,
        `scheduler`) do not fit the learned weights' family or each other; read from configs, so it runs before every
        call (a module swapped after loading, `pipe.vae = ...`, is caught before the LM runs)."""
        components = {name: getattr(self, name, None) for name in ("unet", "transformer", "vae", "scheduler")}
        check_decoder_modules(self.gill.conditioning_layout, components, "the learned weights (`gill`)")

    def default_image_size(
        self, height: int | None, width: int | None, decoder_pipe: DiffusionPipeline | None = None
    ) -> tuple[int, int]:
        """`(height, width)` of generated images: the given sizes, else the denoiser's sample size in pixels (the
        stock pipeline's default size for denoisers without one, e.g. Flux's 1024)."""
        denoiser = getattr(self, self.denoiser_name) if self.denoiser_name else None
        sample = denoiser.config.get("sample_size") if denoiser is not None else 64
        if sample is None:
            sample = (decoder_pipe or self._decoder_pipeline()).default_sample_size
        if isinstance(sample, (list, tuple)):
            sample_h, sample_w = sample
        else:
            sample_h = sample_w = sample
        return height or sample_h * self.vae_scale_factor, width or sample_w * self.vae_scale_factor

    def check_generation_inputs(
        self,
        *,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        guidance_rescale,
        eta,
        cross_attention_kwargs,
        num_images_per_prompt,
        latents,
        decoder_pipe: DiffusionPipeline | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        """The image-generation part of `check_inputs`: checked even when the answer may turn out to have no image,
        so that a wrong value is reported now, not after the LM has decoded."""
        if decoder_pipe is None:
            self.check_decoder()  # `__call__` checked it when it built `decoder_pipe`
        multiple = self.image_size_multiple
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            check_int(value, name, minimum=1)
            if value % multiple:
                raise ValueError(
                    f"`{name}` must be a multiple of {multiple} (one latent patch of the decoder in pixels: VAE scale "
                    f"factor {self.vae_scale_factor} x the denoiser's patch and packing, and what "
                    f"{self.gill.conditioning_layout.pipeline_class} asks), got {value}."
                )
        # Options the decoder family's pipeline does not take are refused now, not after the LM has decoded.
        self._decoder_options(
            decoder_pipe, timesteps=timesteps, sigmas=sigmas, eta=eta, guidance_rescale=guidance_rescale,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        # With custom `timesteps`/`sigmas` the step count is theirs and `num_inference_steps` may be None, as in diffusers.
        if num_inference_steps is not None or (timesteps is None and sigmas is None):
            check_int(num_inference_steps, "num_inference_steps", minimum=1)
        check_number(guidance_scale, "guidance_scale", minimum=0.0)
        check_number(guidance_rescale, "guidance_rescale", minimum=0.0)
        if guidance_rescale > 1:
            raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale!r}.")
        check_number(eta, "eta", minimum=0.0)
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass only one of `timesteps` and `sigmas`, not both.")
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if not isinstance(value, (list, tuple)) or not value or not all(is_number(v) for v in value):
                raise ValueError(f"`{name}` must be a non-empty list of finite numbers, got {value!r:.200}.")
            if self.scheduler is not None and name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`{name}` was given, but the scheduler {type(self.scheduler).__name__} does not accept custom "
                    f"{name} in `set_timesteps`; use `num_inference_steps`, or another scheduler."
                )
        if eta != 0 and self.scheduler is not None and "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"`eta`={eta!r} was given, but the scheduler {type(self.scheduler).__name__} does not use `eta` (only "
                "DDIM-type schedulers do); leave it at 0.0 or use `DDIMScheduler`."
            )
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise TypeError(
                f"`cross_attention_kwargs` must be a dict or None, got {type(cross_attention_kwargs).__name__} "
                f"{cross_attention_kwargs!r:.100}."
            )
        check_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
        if latents is not None:
            self._check_latents(latents, height, width, num_images_per_prompt, decoder_pipe)
        if callback_on_step_end is not None and not (
            callable(callback_on_step_end) or isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks))
        ):
            raise TypeError(
                f"`callback_on_step_end` must be a callable `(pipe, step, timestep, callback_kwargs) -> dict`, a "
                f"diffusers `PipelineCallback` or None, got {type(callback_on_step_end).__name__} "
                f"{callback_on_step_end!r:.100}."
            )
        if callback_on_step_end_tensor_inputs is not None:
            if not isinstance(callback_on_step_end_tensor_inputs, (list, tuple)) or not all(
                isinstance(k, str) and k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
            ):
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be a list of names from {self._callback_tensor_inputs}, "
                    f"got {callback_on_step_end_tensor_inputs!r:.200}."
                )

    def _check_latents(self, latents, height, width, num_images_per_prompt, decoder_pipe=None):
        if not isinstance(latents, torch.Tensor) or latents.ndim not in (3, 4):
            raise ValueError(
                f"`latents` must be a tensor of shape (num_images_per_prompt, C, H, W) (packed (num_images_per_prompt, "
                f"positions, C) for Flux), got {type(latents).__name__} {tuple(getattr(latents, 'shape', ()))}."
            )
        if not latents.is_floating_point():
            raise TypeError(f"`latents` must be a floating-point tensor, got dtype {latents.dtype}.")
        if latents.shape[0] != num_images_per_prompt:
            raise ValueError(
                f"`latents` has {latents.shape[0]} rows but `num_images_per_prompt` is {num_images_per_prompt}: "
                "the same latents are used for every generated [IMG] group."
            )
        if not self.can_generate:
            return
        height, width = self.default_image_size(height, width, decoder_pipe)
        denoiser = getattr(self, self.denoiser_name)
        channels, scale = denoiser.config.in_channels, self.vae_scale_factor
        if isinstance(denoiser, FluxTransformer2DModel):
            # Flux denoises 2x2 patches of the latent image, packed into a sequence of `in_channels`-wide tokens.
            expected = ((height // (scale * 2)) * (width // (scale * 2)), channels)
            rule = f"positions = (height / {scale * 2}) * (width / {scale * 2}), channels = `in_channels`"
        else:
            expected = (channels, height // scale, width // scale)
            rule = f"channels = `in_channels`, size = image size / {scale}"
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"`latents` has shape {tuple(latents.shape)}, but images of {height}x{width} with this "
                f"{type(denoiser).__name__} need (num_images_per_prompt, {', '.join(map(str, expected))}) ({rule})."
            )
        if not torch.isfinite(latents).all():
            raise ValueError("`latents` contains NaN or infinite values.")

    def _decoder_pipeline(self) -> DiffusionPipeline:
        """The decoder family's stock pipeline (`StableDiffusionPipeline`, `FluxPipeline`, ...) over this pipeline's
        own decoder modules, text side None. The family is the learned weights'. `__call__` builds it once, after
        `check_decoder` (the stock `__init__` itself fails on some misfits, e.g. Sana's on an AutoencoderKL)."""
        self.check_decoder()
        components = {"vae": self.vae, "scheduler": self.scheduler, self.denoiser_name: getattr(self, self.denoiser_name)}
        pipe = build_decoder_pipeline(components, layout=self.gill.conditioning_layout)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def _decoder_options(self, decoder_pipe: DiffusionPipeline | None = None, **options) -> dict:
        """The generation options that differ from their defaults, under the decoder family's `__call__` names; an
        option the family's pipeline does not take is refused (called by `check_inputs`, before the LM runs)."""
        if not self.can_generate:
            return {}
        call_params = inspect.signature(type(decoder_pipe or self._decoder_pipeline()).__call__).parameters
        passed = {}
        for name, value in options.items():
            if value is None or (name in ("eta", "guidance_rescale") and value == 0):
                continue
            target = next((n for n in DECODER_OPTION_NAMES[name] if n in call_params), None)
            if target is None:
                raise ValueError(
                    f"`{name}`={value!r:.100} was given, but the decoder "
                    f"{self.gill.conditioning_layout.pipeline_class} takes no such option; leave it at its default."
                )
            passed[target] = value
        return passed

    def generate_images(
        self,
        prompt_embeds: torch.Tensor | dict[str, torch.Tensor],
        *,
        generators: list | torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        cross_attention_kwargs: dict | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        decoder_pipe: DiffusionPipeline | None = None,
    ) -> torch.Tensor:
        """The mapper's conditioning (`gill.map_to_conditioning`, or the sequence `(N, L, W)` alone for decoders
        that take nothing else) -> images `(N * num_images_per_prompt, C, H, W)` in [0, 1] (or latents), by the
        decoder family's stock denoising loop over this pipeline's modules, with the stored negatives.
        `decoder_pipe` is that stock pipeline when the caller has built it already (see `_decoder_pipeline`)."""
        if decoder_pipe is None:
            decoder_pipe = self._decoder_pipeline()
        layout = self.gill.conditioning_layout
        conditioning = prompt_embeds if isinstance(prompt_embeds, dict) else {"prompt_embeds": prompt_embeds}
        num_prompts = next(iter(conditioning.values())).shape[0]
        self._guidance_scale, self._guidance_rescale, self._interrupt = guidance_scale, guidance_rescale, False
        self._cross_attention_kwargs = cross_attention_kwargs
        options = self._decoder_options(
            decoder_pipe, timesteps=timesteps, sigmas=sigmas, eta=eta, guidance_rescale=guidance_rescale,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        device = next(iter(conditioning.values())).device
        negatives = {name: value.to(device) for name, value in self.gill.negative_conditioning().items()}
        if latents is not None:
            latents = latents.repeat(num_prompts, *([1] * (latents.ndim - 1)))
        height, width = self.default_image_size(height, width, decoder_pipe)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        def callback(stock_pipe, step, timestep, callback_kwargs):
            # The callback sees (and may change) this pipeline's state; the loop then follows it.
            self._num_timesteps = stock_pipe.num_timesteps
            outputs = callback_on_step_end(self, step, timestep, callback_kwargs)
            stock_pipe._guidance_scale = self._guidance_scale
            stock_pipe._interrupt = self._interrupt
            return outputs

        images, ran = run_decoder(
            decoder_pipe,
            conditioning,
            negatives or None,
            layout=layout,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            latents=latents,
            num_images_per_prompt=num_images_per_prompt,
            output_type="latent" if output_type == "latent" else "pt",
            callback_on_step_end=callback if callback_on_step_end is not None else None,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            return_pipeline=True,
            **options,
        )
        # PixArt's pipeline keeps no `num_timesteps`: the scheduler's timesteps are the steps it ran.
        self._num_timesteps = getattr(ran, "_num_timesteps", None) or len(ran.scheduler.timesteps)
        return images

    @torch.no_grad()
    def rank_candidates(self, images: torch.Tensor, img0_hidden: torch.Tensor) -> torch.Tensor:
        """Cosine similarity in retrieval space between generated images `(n, C, H, W)` and one `[IMG0]` state."""
        pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(images.float().cpu()))
        # The vision encoder runs on the execution device (its weights may be offloaded); `gill` takes its inputs
        # onto its own device.
        features = self.encode_image_features(pil, self._execution_device)
        image_embeds = self.gill.image_retrieval_embeds(features)
        text_embed = self.gill.text_retrieval_embeds(img0_hidden[None])
        return (image_embeds @ text_embed.t())[:, 0].float()

    def _postprocess(self, images: torch.Tensor, output_type: str):
        if output_type in ("latent", "pt"):
            return list(images)
        array = self.image_processor.pt_to_numpy(images.float().cpu())
        if output_type == "np":
            return list(array)
        return self.image_processor.numpy_to_pil(array)

    _expand_generators = staticmethod(expand_generators)

    def generate_for_groups(
        self, img_hidden, requests, to_generate, probs, *, generator, num_images_per_prompt, output_type, **decoder_kwargs
    ) -> dict[tuple[int, int], GILLImage]:
        """Step 7: map the `[IMG]` states of the groups `to_generate` to prompt embeddings and denoise; candidates of
        a group are ranked by their retrieval-space similarity to `[IMG0]` (when there are several and an image encoder);
        a single candidate is not scored."""
        if not to_generate:
            return {}
        conditioning = self.gill.map_to_conditioning(img_hidden[to_generate])
        generators = expand_generators(generator, [requests[i][0] for i in to_generate], num_images_per_prompt)
        generated = self.generate_images(
            conditioning,
            generators=generators,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            **decoder_kwargs,
        )
        result = {}
        for n, i in enumerate(to_generate):
            candidates = generated[n * num_images_per_prompt : (n + 1) * num_images_per_prompt]
            scores = {}
            # Several candidates are ranked by their retrieval-space similarity to [IMG0]. One candidate needs no
            # ranking: the vision tower is not run for it (it cost a CLIP forward per image), and `scores` stays empty.
            if len(candidates) > 1 and output_type != "latent" and self.image_encoder is not None:
                similarity = self.rank_candidates(candidates, img_hidden[i, 0])
                order = similarity.argsort(descending=True)
                candidates, scores = candidates[order], {"similarity": similarity[order].tolist()}
            candidates = self._postprocess(candidates, output_type)
            result[requests[i]] = GILLImage(
                image=candidates[0],
                source="generated",
                decision_probs=probs[i],
                scores=scores,
                candidates=candidates,
                prompt_embeds_index=requests[i][1],
            )
        return result

"""The CLIP a user passes in, as the metrics need it: image embeddings, text embeddings, a torchmetrics-ready pair.

Any local folder (or object) works: a whole `CLIPModel` (image and text towers; needed for CLIP score and for the
CLIP retrieval baseline), or a vision tower alone (`CLIPVisionModel`, `CLIPVisionModelWithProjection`; enough for the
CLIP similarity of two images and for CLIP-feature FID). Nothing here names a Hub model: the paper used
`openai/clip-vit-large-patch14`, which a user downloads once and passes as a folder.
"""

import os

import numpy as np
import PIL.Image
import torch


PREPROCESSOR_FILE = "preprocessor_config.json"


def to_pil_images(images) -> list[PIL.Image.Image]:
    """Images as PIL, or a tensor `(N, 3, H, W)` / list of `(3, H, W)` tensors in [0, 1] -> RGB PIL images."""
    out = []
    for image in images:
        if isinstance(image, PIL.Image.Image):
            out.append(image.convert("RGB"))
            continue
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"Expected PIL images or (3, H, W) tensors in [0, 1], got {type(image).__name__} "
                             f"{tuple(getattr(image, 'shape', ()))}.")
        array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        out.append(PIL.Image.fromarray(array))
    return out


def _as_features(output) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features (features in `pooler_output`); older versions a
    # tensor. Vision towers give `pooler_output` or, with a projection, `image_embeds`.
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise ValueError(f"Cannot read features from a {type(output).__name__}: it has no `pooler_output` or embeddings.")


class ImageEmbedder(torch.nn.Module):
    r"""
    A CLIP image tower as a feature network: images `(N, 3, H, W)` in [0, 1] (or PIL images) -> `(N, F)` CPU features,
    through the model's own image processor. Usable as the FID feature
    extractor ("CLIP-FID").

    Args:
        model: a `CLIPModel` (its projected image features) or a vision model whose output has `image_embeds` or
            `pooler_output` (the pooled feature GILL itself reads).
        image_processor: the model's image processor.
    """

    def __init__(self, model, image_processor):
        super().__init__()
        self.model = model.eval()
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str, processor_path: str | None = None, dtype: torch.dtype = torch.float32):
        """Loads a CLIP (whole, or its vision tower) and its image processor from local folders."""
        from transformers import AutoConfig, AutoImageProcessor, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

        if not os.path.isdir(path):
            raise FileNotFoundError(f"The CLIP folder {path!r} does not exist (pass a local folder).")
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type == "clip":
            model = CLIPModel.from_pretrained(path, dtype=dtype)
        elif model_type == "clip_vision_model":
            has_projection = _has_weight(path, "visual_projection")
            model = (CLIPVisionModelWithProjection if has_projection else CLIPVisionModel).from_pretrained(path, dtype=dtype)
        else:
            raise ValueError(f"The folder {path!r} holds a {model_type!r} model; expected a CLIP (`clip` or `clip_vision_model`).")
        return cls(model, load_image_processor(path, processor_path, AutoImageProcessor))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        pixel_values = self.image_processor(images=to_pil_images(images), return_tensors="pt").pixel_values
        parameter = next(self.model.parameters())
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if hasattr(self.model, "get_image_features"):
            features = _as_features(self.model.get_image_features(pixel_values=pixel_values))
        else:
            features = _as_features(self.model(pixel_values=pixel_values))
        # On the CPU, where the metrics keep their state (torchmetrics' FID sums features into CPU tensors).
        return features.float().cpu()


def _has_weight(path: str, prefix: str) -> bool:
    from safetensors import safe_open

    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                if any(key.startswith(prefix) for key in f.keys()):
                    return True
    return False


def load_image_processor(path: str, processor_path: str | None, loader):
    folder = processor_path or path
    if not os.path.isfile(os.path.join(folder, PREPROCESSOR_FILE)):
        raise FileNotFoundError(
            f"No {PREPROCESSOR_FILE} in {folder!r}: pass the folder of the CLIP's image processor as `processor_path` "
            "(`--clip-processor`)."
        )
    return loader.from_pretrained(folder)


class CLIPTextImageScorer:
    r"""
    A whole CLIP (image and text towers) with its tokenizer and image processor, for CLIP score and the CLIP
    retrieval baseline. `as_torchmetrics()` gives the `(model, processor)` pair torchmetrics' `CLIPScore` accepts as
    `model_name_or_path`: transformers 5 returns output objects from `get_*_features`, which torchmetrics (written
    for tensors) cannot read, so the pair wraps them.
    """

    def __init__(self, model, tokenizer, image_processor):
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ValueError(f"A CLIP with both towers is needed (`CLIPModel`), got {type(model).__name__}.")
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.images = ImageEmbedder(model, image_processor)

    @classmethod
    def from_pretrained(cls, path: str, processor_path: str | None = None, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"The CLIP folder {path!r} does not exist (pass a local folder).")
        if AutoConfig.from_pretrained(path).model_type != "clip":
            raise ValueError(f"The folder {path!r} is not a whole CLIP (`CLIPModel`); CLIP score needs its text tower too.")
        model = CLIPModel.from_pretrained(path, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), load_image_processor(path, processor_path, AutoImageProcessor))

    @property
    def max_text_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.images.device)
        return _as_features(
            self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        ).float().cpu()

    def image_embeds(self, images) -> torch.Tensor:
        return self.images(images)

    def as_torchmetrics(self):
        """A factory for torchmetrics' `CLIPScore(model_name_or_path=...)`."""
        scorer = self

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.clip = scorer.model
                self.config = scorer.model.config

            def get_image_features(self, pixel_values):
                return _as_features(self.clip.get_image_features(pixel_values=pixel_values))

            def get_text_features(self, input_ids, attention_mask=None):
                return _as_features(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

        def processor(text=None, images=None, return_tensors="pt", padding=True):
            if images is not None:
                return {"pixel_values": scorer.image_processor(images=to_pil_images(images), return_tensors="pt").pixel_values}
            return dict(
                scorer.tokenizer(text, padding=padding, truncation=True, max_length=scorer.max_text_length, return_tensors="pt")
            )

        return lambda: (Model(), processor)

"""Generation targets: the decoder's text conditioning of the captions, computed on the fly or stored by
precompute.py.

For Stable Diffusion 1.x/2.x a target is the text encoder's `(L, W)` sequence. For the other decoder families it is
everything the family's own `encode_prompt` returns (`gill_pipeline.decoders.encode_conditioning`: the sequence, a
pooled vector, an attention mask), a dict of tensors; shards store each under `target.<name>`.

A stored set is a folder of safetensors shards plus `index.json`, which records a fingerprint of the text encoders and
tokenizers that made the targets (and of the vision encoder, if image features are stored too), and for the other
families the decoder's conditioning layout. A run checks them against the models it uses: targets of another
checkpoint are an error, not silent garbage.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open

from gill_pipeline.decoders import ConditioningLayout, encode_conditioning

INDEX_FILE = "index.json"
UNCOND_FILE = "uncond.safetensors"
SHARD_TEMPLATE = "targets-{index:05d}.safetensors"
TARGET_KEY = "target"
# Shards of a decoder family other than SD 1.x/2.x: one entry per conditioning tensor, `target.prompt_embeds`, ...
TENSOR_KEY_PREFIX = TARGET_KEY + "."
FEATURES_KEY = "image_features"
# 2: example keys unique per data-set row (`training.records.record_key`), weights fingerprinted at bfloat16 precision.
FORMAT_VERSION = 2


class TargetMismatchError(ValueError):
    """Stored targets were made with other models than the ones of this run."""


@torch.no_grad()
def module_fingerprint(module) -> str:
    """sha256 over the parameter and buffer names, shapes and values, floating-point values rounded to bfloat16.

    The rounding makes a float32 module and its bfloat16 copy hash alike (`.to(torch.bfloat16)` rounds the same way),
    so targets made with float32 weights stay valid for a run that loads the same weights in bfloat16. A float16
    copy does NOT hash like its float32 original (float16 rounds small values differently): fingerprint a module
    before casting it to float16 (training checks the targets before `frozen_dtype` is applied).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        values = tensor.detach().to("cpu")
        if values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)  # numpy has no bfloat16: hash its bits
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{vocab}|{tokenizer.model_max_length}|{type(tokenizer).__name__}".encode()).hexdigest()


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Captions -> SD's text conditioning `(N, length, width)`, padded to `length` as SD pipelines do."""
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def encode_family_targets(decoder, captions: list[str], device=None) -> dict[str, torch.Tensor]:
    """Targets of a decoder family from its own `encode_prompt` (under `no_grad`: a T5 forward with autograd differs
    by about 1e-5): `{name: (N, ...)}`, float32 embeddings, masks as they come."""
    targets = encode_conditioning(decoder, captions, device=device)
    return {name: value if name.endswith("attention_mask") else value.float() for name, value in targets.items()}


def decoder_fingerprint(decoder) -> dict[str, str]:
    """Fingerprints of a decoder pipeline's text side (every text encoder and tokenizer it has)."""
    fingerprint = {}
    for name, component in sorted(decoder.components.items()):
        if component is None:
            continue
        if name.startswith("text_encoder"):
            fingerprint[name] = module_fingerprint(component)
        elif name.startswith("tokenizer"):
            fingerprint[name] = tokenizer_fingerprint(component)
    return fingerprint


def stack_targets(targets: list):
    """Per-example targets -> a batch: stacked tensors, or a dict of stacked tensors for the other families."""
    if isinstance(targets[0], dict):
        return {name: torch.stack([t[name] for t in targets]) for name in targets[0]}
    return torch.stack(targets)


class TargetStore:
    """Read access to a folder written by precompute.py: `store.get(key) -> {"target", "image_features"?}`."""

    def __init__(self, folder: str):
        index_path = os.path.join(folder, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"Precomputed targets folder {folder!r} has no {INDEX_FILE}; run precompute.py.")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path} has format version {self.index.get('format_version')!r}, expected {FORMAT_VERSION}: "
                "it was written by an older precompute.py. Run precompute.py again."
            )
        self.folder = folder
        self.layout = ConditioningLayout.from_dict(self.index["layout"]) if self.index.get("layout") else None
        self.has_image_features = bool(self.index["has_image_features"])
        self.location = {}
        for shard in self.index["shards"]:
            for row, key in enumerate(shard["keys"]):
                if key in self.location:
                    raise ValueError(
                        f"Precomputed targets folder {folder!r} holds example key {key!r} twice "
                        f"({self.location[key][0]} and {shard['file']}): one of the two targets would be used for both "
                        "examples. Run precompute.py again."
                    )
                self.location[key] = (shard["file"], row)
        self._handles = {}

    def __getstate__(self):  # DataLoader workers get their own file handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self):
        return len(self.location)

    def _handle(self, file_name):
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(os.path.join(self.folder, file_name), framework="pt")
        return self._handles[file_name]

    def get(self, key: str) -> dict | None:
        if key not in self.location:
            return None
        file_name, row = self.location[key]
        handle = self._handle(file_name)
        if self.layout is not None:
            item = {TARGET_KEY: {}}
            for tensor in self.layout.tensors:
                value = handle.get_slice(TENSOR_KEY_PREFIX + tensor.name)[row : row + 1][0]
                item[TARGET_KEY][tensor.name] = value.long() if tensor.kind == "mask" else value.float()
        else:
            item = {TARGET_KEY: handle.get_slice(TARGET_KEY)[row : row + 1][0].float()}
        if self.has_image_features:
            item[FEATURES_KEY] = handle.get_slice(FEATURES_KEY)[row : row + 1][0].float()
        return item

    def uncond(self) -> torch.Tensor | dict[str, torch.Tensor]:
        with safe_open(os.path.join(self.folder, UNCOND_FILE), framework="pt") as f:
            if self.layout is not None:
                return {
                    key[len(TENSOR_KEY_PREFIX):]: f.get_tensor(key) for key in f.keys() if key.startswith(TENSOR_KEY_PREFIX)
                }
            return f.get_tensor(TARGET_KEY).float()

    def _validate_layout(self, gill, decoder) -> None:
        expected = gill.conditioning_layout
        if self.layout is None or (self.layout.pipeline_class, self.layout.tensors) != (
            expected.pipeline_class, expected.tensors
        ):
            made = self.layout.describe() if self.layout is not None else "Stable Diffusion 1.x/2.x targets"
            raise TargetMismatchError(
                f"Targets in {self.folder!r} are {made}, but the pipeline's decoder takes {expected.describe()}. Run "
                "precompute.py again with this decoder."
            )
        stored, uncond = gill.negative_conditioning(), self.uncond()
        for name, value in stored.items():
            if name not in uncond or not torch.allclose(uncond[name].float(), value.float().cpu(), atol=1e-2, rtol=1e-2):
                raise TargetMismatchError(
                    f"Targets in {self.folder!r} were made with other text encoders than the ones this pipeline was "
                    f"assembled with (their negative `{name}` differs). Run precompute.py again."
                )
        if decoder is not None and decoder_fingerprint(decoder) != self.index["fingerprint"]["decoder"]:
            raise TargetMismatchError(
                f"Targets in {self.folder!r} were made with other text encoders than this run's "
                f"{type(decoder).__name__}. Run precompute.py again with the current checkpoint."
            )

    def validate(self, gill, text_encoder=None, tokenizer=None, image_encoder=None, decoder=None) -> None:
        """Raises [`TargetMismatchError`] when these targets do not belong to the models of this run (`decoder`: the
        text side of a decoder family other than SD 1.x/2.x, when loaded)."""
        fingerprint = self.index["fingerprint"]
        if self.layout is not None or gill.config.conditioning_layout is not None:
            self._validate_layout(gill, decoder)
            self._validate_image_features(image_encoder)
            return
        shape = tuple(self.index["target_shape"])
        expected = (gill.config.cond_length, gill.config.cond_dim)
        if shape != expected:
            raise TargetMismatchError(
                f"Targets in {self.folder!r} have shape {shape}, but the pipeline's UNet conditioning is {expected}."
            )
        # The pipeline stores the empty-prompt embedding of the SD text encoder it was assembled with; the targets'
        # own empty-prompt embedding must match it even when no text encoder is loaded in this run.
        uncond = self.uncond()
        if not torch.allclose(uncond, gill.uncond_prompt_embeds.float().cpu(), atol=1e-2, rtol=1e-2):
            raise TargetMismatchError(
                f"Targets in {self.folder!r} were made with another SD text encoder than the one this pipeline was "
                "assembled with (their empty-prompt embeddings differ). Run precompute.py again."
            )
        if text_encoder is not None and module_fingerprint(text_encoder) != fingerprint["text_encoder"]:
            raise TargetMismatchError(
                f"Targets in {self.folder!r} were made with another SD text encoder (fingerprint "
                f"{fingerprint['text_encoder'][:12]}..., this run's is {module_fingerprint(text_encoder)[:12]}...). "
                "Run precompute.py again with the current SD checkpoint."
            )
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != fingerprint["tokenizer"]:
            raise TargetMismatchError(f"Targets in {self.folder!r} were made with another SD tokenizer. Run precompute.py again.")
        self._validate_image_features(image_encoder)

    def _validate_image_features(self, image_encoder) -> None:
        if self.has_image_features and image_encoder is not None:
            if module_fingerprint(image_encoder) != self.index["fingerprint"].get("image_encoder"):
                raise TargetMismatchError(
                    f"Image features in {self.folder!r} were made with another vision encoder. Run precompute.py again."
                )

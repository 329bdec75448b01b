"""Generation targets: SD text-encoder outputs for captions, computed on the fly or stored by precompute.py.

A stored set is a folder of safetensors shards plus `index.json`, which records a fingerprint of the text encoder and
tokenizer that made the targets (and of the vision encoder, if image features are stored too). A run checks the
fingerprint against the models it uses: targets of another SD checkpoint are an error, not silent garbage.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open

INDEX_FILE = "index.json"
UNCOND_FILE = "uncond.safetensors"
SHARD_TEMPLATE = "targets-{index:05d}.safetensors"
TARGET_KEY = "target"
FEATURES_KEY = "image_features"
# 2: example keys unique per data-set row (`training.data.record_key`), weights fingerprinted at bfloat16 precision.
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
        item = {TARGET_KEY: handle.get_slice(TARGET_KEY)[row : row + 1][0].float()}
        if self.has_image_features:
            item[FEATURES_KEY] = handle.get_slice(FEATURES_KEY)[row : row + 1][0].float()
        return item

    def uncond(self) -> torch.Tensor:
        with safe_open(os.path.join(self.folder, UNCOND_FILE), framework="pt") as f:
            return f.get_tensor(TARGET_KEY).float()

    def validate(self, gill, text_encoder=None, tokenizer=None, image_encoder=None) -> None:
        """Raises [`TargetMismatchError`] when these targets do not belong to the models of this run."""
        fingerprint = self.index["fingerprint"]
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
        if self.has_image_features and image_encoder is not None:
            if module_fingerprint(image_encoder) != fingerprint.get("image_encoder"):
                raise TargetMismatchError(
                    f"Image features in {self.folder!r} were made with another vision encoder. Run precompute.py again."
                )

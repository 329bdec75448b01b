"""Saving and loading GILL: one home for every format this library writes and reads.

- `folder`: checks of a saved pipeline folder before any weight is read (files, kinds, safety, fit of the learned parts).
- `learned_weights`: the learned parts alone (a few MB) with the record of their base models.
- `base_models`: that record (Hub ids and revisions of the frozen LM, decoder and vision encoder).
- `components`: a pipeline put together from loaded parts.
- `lora`: the LM's LoRA adapter beside the components (peft format).
- `quantization`: one quantization config routed per component; `quantized_save`: torchao components written one shard
  at a time in their library's format; `saved_dtypes`: the dtype each saved component reloads in.
- `staged_folder`: saves written to a hidden folder inside the target and moved in when complete (a failed save changes nothing).
- `model_card`: the Hub's `README.md` for a folder.
- `hub`: downloading a folder from, and uploading one to, the Hugging Face Hub; `push`: save + card + upload.
- `convert_original`: the reference GILL release (kohjingyu/gill) turned into this package's format.
- `paths`: a local path or a Hub repo id.

File and component names live in `gill_pipeline.constants`. This `__init__` imports nothing, so that each module can
be imported on its own by the layers above (models, pipeline, commands) without loading the rest.
"""

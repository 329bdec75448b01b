"""Drops notices that importing diffusers prints and that concern no user of this package.

- Without torchvision, transformers warns that it falls back to the PIL-backed image processors: that fallback is what
  this package uses anyway (its processors are the PIL ones).
- With torchao installed (the `quant` extra), diffusers 0.42 tries to register torchao tensor classes for
  `torch.load` that torchao 0.18 no longer has, and warns "Unable to import `torchao` Tensor objects": that only
  concerns pickled torchao checkpoints, which this package never loads (safetensors only); and torch warns about
  torchao's enums being registered for torch.compile.

Each would clutter every program and CLI run; every other message is kept. Imported first by
`gill_pipeline/__init__.py`, before diffusers is.
"""

import logging

FALLBACK_NOTICE = "requires torchvision (not installed); falling back to"
TORCHAO_PICKLE_NOTICE = "Unable to import `torchao` Tensor objects"
TORCHAO_ENUM_NOTICE = "is an Enum subclass and is now natively supported by torch.compile"

# logger name -> the notice dropped from it (a filter on a logger sees exactly the records logged on it)
DROPPED = {
    "transformers.utils.import_utils": FALLBACK_NOTICE,
    "diffusers.quantizers.torchao.torchao_quantizer": TORCHAO_PICKLE_NOTICE,
    "torch.utils._pytree": TORCHAO_ENUM_NOTICE,
}


class _DropNotice(logging.Filter):
    def __init__(self, notice: str):
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        return self.notice not in record.getMessage()


for _logger, _notice in DROPPED.items():
    logging.getLogger(_logger).addFilter(_DropNotice(_notice))

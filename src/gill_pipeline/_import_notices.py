"""Drops one notice that importing diffusers prints and that concerns no user of this package.

diffusers imports `CLIPImageProcessor` and `SiglipImageProcessor` when it is imported; without torchvision,
transformers then warns that it falls back to the PIL-backed class. That fallback is what this package uses anyway
(its processors are the PIL ones), so the notice only clutters every program and CLI run. Every other message of
transformers is kept. Imported first by `gill_pipeline/__init__.py`, before diffusers is.
"""

import logging

FALLBACK_NOTICE = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FALLBACK_NOTICE not in record.getMessage()


# transformers logs the notice on this module's logger; a filter on a logger sees exactly the records logged on it.
logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())

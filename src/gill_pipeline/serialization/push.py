"""Sharing a pipeline: save it (whole, or its learned weights only), write its model card, upload the folder.

The top of the saving side: it uses `learned_weights`, `model_card` and `hub`, and none of them uses it.
"""

import inspect
import tempfile

from .hub import push_folder_to_hub
from .learned_weights import save_learned_weights
from .model_card import write_model_card

# The options of the upload (`token`, `private`, `revision`, `delete_remote_files`, ...); the others go to the save.
PUSH_OPTIONS = tuple(
    p.name for p in inspect.signature(push_folder_to_hub).parameters.values() if p.kind is p.KEYWORD_ONLY
)


def push_pipeline_to_hub(
    pipe,
    repo_id: str,
    *,
    learned_weights_only: bool = False,
    card_info=None,
    commit_message: str | None = None,
    **kwargs,
) -> str:
    """Saves `pipe` (whole, or its learned weights only) with a model card and uploads it; returns the commit URL.

    `kwargs` named in [`push_folder_to_hub`] (`token`, `private`, `create_pr`, `revision`, `delete_remote_files`,
    `overwrite_model_card`) go to the upload, the others to the save. Files the repo already holds are kept, and so
    is its model card, unless `delete_remote_files=True` / `overwrite_model_card=True`; a push that would mix a whole
    pipeline with learned weights is refused.
    """
    push_kwargs = {name: kwargs.pop(name) for name in PUSH_OPTIONS if name in kwargs}
    with tempfile.TemporaryDirectory() as tmp:
        if learned_weights_only:
            save_learned_weights(pipe, tmp, **kwargs)
        else:
            pipe.save_pretrained(tmp, **kwargs)
        write_model_card(tmp, repo_id=repo_id, info=card_info)
        return push_folder_to_hub(
            tmp,
            repo_id,
            commit_message=commit_message
            or ("Upload GILL learned weights" if learned_weights_only else "Upload GILL pipeline"),
            **push_kwargs,
        )

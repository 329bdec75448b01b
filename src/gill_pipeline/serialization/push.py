"""Sharing a pipeline: save it (whole, or its learned weights only), write its model card, upload the folder.

The top of the saving side: it uses `learned_weights`, `model_card` and `hub`, and none of them uses it.
"""

import tempfile

from .hub import push_folder_to_hub
from .learned_weights import save_learned_weights
from .model_card import write_model_card


def push_pipeline_to_hub(
    pipe,
    repo_id: str,
    *,
    learned_weights_only: bool = False,
    card_info=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    replace: bool = True,
    **save_kwargs,
) -> str:
    """Saves `pipe` (whole, or its learned weights only) with a model card and uploads it; returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        if learned_weights_only:
            save_learned_weights(pipe, tmp, **save_kwargs)
        else:
            pipe.save_pretrained(tmp, **save_kwargs)
        write_model_card(tmp, repo_id=repo_id, info=card_info)
        return push_folder_to_hub(
            tmp,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message
            or ("Upload GILL learned weights" if learned_weights_only else "Upload GILL pipeline"),
            create_pr=create_pr,
            revision=revision,
            replace=replace,
        )

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
    delete_remote_files: bool = False,
    overwrite_model_card: bool = False,
    replace: bool | None = None,
    **save_kwargs,
) -> str:
    """Saves `pipe` (whole, or its learned weights only) with a model card and uploads it; returns the commit URL.

    Files the repo already holds are kept, and so is its model card, unless `delete_remote_files=True` /
    `overwrite_model_card=True`; a push that would mix a whole pipeline with learned weights is refused. See
    [`push_folder_to_hub`].
    """
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
            delete_remote_files=delete_remote_files,
            overwrite_model_card=overwrite_model_card,
            replace=replace,
        )

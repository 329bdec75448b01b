"""The retrieval mixin of `GILLPipeline`, in the way of diffusers' `IPAdapterMixin`: load a retrieval set into the
pipeline, and retrieve images for the `[IMG]` groups of an answer."""

import os

import PIL.Image
from diffusers.utils import logging

from ..pipeline_output import GILLImage
from ...retrieval import RETRIEVAL_ID_INFO_KEY, RetrievalIndex


logger = logging.get_logger(__name__)


class RetrievalMixin:
    """Retrieval for `GILLPipeline`: `self.retrieval_index` (set by `load_retrieval_index`) serves the `[IMG]`
    groups the decision head sends to retrieval."""

    retrieval_index = None

    def load_retrieval_index(
        self, path_or_repo_id, allow_urls: bool = False, image_root: str | os.PathLike | None = None, **hub_kwargs
    ):
        r"""
        Loads a retrieval index (see [`~gill_pipeline.retrieval.RetrievalIndex`]) and uses it for `image_mode`
        `"auto"`, `"retrieve"` and `"both"`. Sets and returns `self.retrieval_index`.

        Args:
            path_or_repo_id (`str`, `os.PathLike` or [`RetrievalIndex`]): A folder written by
                `RetrievalIndex.save_pretrained` or `build_retrieval_index`, a Hub repo id, or an index object.
            allow_urls (`bool`, *optional*, defaults to `False`): Allow downloading images whose index path is a URL.
            image_root (`str`, *optional*): Folder that the index's local image paths are relative to (paths that
                resolve outside it are refused). Defaults to the one recorded in the index folder.
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, `repo_type`, ... for Hub repos.

        Raises:
            [`IndexWeightsMismatchError`]: if the index was built with other learned weights or another vision
            encoder than this pipeline's.
        """
        if isinstance(path_or_repo_id, RetrievalIndex):
            index, where = path_or_repo_id, "given"
            if allow_urls:
                index.allow_urls = True
            if image_root is not None:
                index.image_root = str(image_root)
        else:
            index = RetrievalIndex.from_pretrained(
                path_or_repo_id, image_root=image_root, allow_urls=allow_urls, **hub_kwargs
            )
            where = repr(str(path_or_repo_id))
        index.check_compatible(self, where=where)
        self.retrieval_index = index
        return index

    def retrieve_images(self, img_hidden, requests, batch, output_type) -> list[GILLImage | None]:
        """One retrieved image per `[IMG]` group (hidden states `(N, r, D)`, `requests[n] = (input, group)`), never an
        image already shown in the same answer: neither one retrieved for an earlier group nor an input image that
        came from the index (a retrieved PIL image given back as input). `None` where no image is left to show."""
        index = self.retrieval_index
        if index is None:
            raise ValueError("No retrieval set is loaded; load one with `pipe.load_retrieval_index(...)`.")
        queries = self.gill.text_retrieval_embeds(img_hidden[:, 0]).float()
        owners = [b for b, _ in requests]
        exclude = {
            b: {
                x.info[RETRIEVAL_ID_INFO_KEY]
                for x in batch[b]
                if isinstance(x, PIL.Image.Image) and RETRIEVAL_ID_INFO_KEY in x.info
            }
            for b in set(owners)
        }
        images = []
        for found in index.retrieve(queries.to(index.device), owners, exclude, allow_missing=True):
            if found is None:  # nothing left to show for this group: the caller falls back
                images.append(None)
                continue
            image = found.image
            if output_type != "pil":
                image = self.image_processor.pil_to_numpy([image])
                # Retrieved images are never latents: with output_type="latent" they come as "pt" tensors.
                image = image[0] if output_type == "np" else self.image_processor.numpy_to_pt(image)[0]
            images.append(
                GILLImage(
                    image=image,
                    source="retrieved",
                    scores={"similarity": [found.similarity]},
                    candidates=[image],
                    metadata={**found.record, "rank": found.rank, "skipped_ids": found.skipped_ids},
                )
            )
        return images

    def retrieve_for_groups(
        self, img_hidden, requests, retrieve, probs, batch, image_mode, output_type, warnings
    ) -> dict[tuple[int, int], GILLImage]:
        """Step 6: a retrieved image for each group sent to retrieval (every group with `image_mode="both"`).

        A group for which the retrieval set has no image left (all shown already in this answer, or unloadable) is
        missing from the result and noted in `warnings`; step 7 generates it when the pipeline can."""
        wanted = [i for i in range(len(requests)) if retrieve[i] or image_mode == "both"]
        if not wanted or self.retrieval_index is None:
            return {}
        found = self.retrieve_images(img_hidden[wanted], [requests[i] for i in wanted], batch, output_type)
        result = {}
        for i, image in zip(wanted, found):
            b, g = requests[i]
            if image is None:
                fallback = "it is generated instead" if self.can_generate else "it is left out (no image decoder)"
                message = (
                    f"[IMG] group {g}: the retrieval set has no image left to show (every candidate was already "
                    f"shown in this answer or could not be loaded); {fallback}."
                )
                logger.warning(f"Answer {b}: {message}")
                warnings[b].append(message)
                continue
            image.decision_probs = probs[i]
            image.prompt_embeds_index = g
            result[requests[i]] = image
        return result

    def apply_min_similarity(self, requests, retrieve, retrieved, image_mode) -> list[bool]:
        """Step 6b: with `image_mode` "auto" or "both" and a retrieval set that has a `min_similarity`, a group the
        decision head sent to retrieval whose retrieved image scores below it shows the generated image instead (the
        retrieved one stays in `alternatives`): the set does not hold what was asked for. Returns the new choices."""
        floor = getattr(self.retrieval_index, "min_similarity", None)
        if floor is None or image_mode not in ("auto", "both") or not self.can_generate:
            return retrieve
        retrieve = list(retrieve)
        for i, key in enumerate(requests):
            image = retrieved.get(key)
            if retrieve[i] and image is not None and image.scores["similarity"][0] < floor:
                retrieve[i] = False
                image.metadata["below_min_similarity"] = floor
        return retrieve

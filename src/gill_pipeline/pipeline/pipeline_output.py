from dataclasses import dataclass, field
from typing import Any, Union

from diffusers.utils import BaseOutput


@dataclass
class GILLImage:
    r"""
    One image in GILL's answer.

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
            The image in the requested `output_type` (the best candidate when several were generated); latents when
            `output_type="latent"`.
        source (`str`):
            `"generated"` or `"retrieved"`.
        decision_probs (`tuple[float, float]`):
            The decision head's (generate, retrieve) probabilities for this `[IMG]` group.
        scores (`dict`):
            Scores behind the choice, e.g. `"similarity"`: retrieval-space cosine similarity of each candidate to
            the `[IMG0]` embedding (present when candidates were ranked or retrieved).
        candidates (`list`):
            Every candidate for this `[IMG]` group, best first (`num_images_per_prompt` generated images).
        prompt_embeds_index (`int`):
            Index of this group among the answer's `[IMG]` groups.
        metadata (`dict`):
            For retrieved images, the index record: `id`, `path` (or URL), `caption`, plus `rank` (position in the
            search results) and `skipped_ids` (better candidates that could not be loaded). Empty for generated ones.
        alternatives (`list[GILLImage]`):
            With `image_mode="both"`, the other candidate for this `[IMG]` group: the retrieved image when the
            decision head chose to generate, the generated one when it chose to retrieve. Empty otherwise.
    """

    image: Any
    source: str
    decision_probs: tuple[float, float] | None = None
    scores: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)
    prompt_embeds_index: int = 0
    metadata: dict = field(default_factory=dict)
    alternatives: list["GILLImage"] = field(default_factory=list)


@dataclass
class GILLPipelineOutput(BaseOutput):
    r"""
    Output of [`GILLPipeline`].

    Args:
        outputs (`list[list[str | GILLImage]]`):
            One interleaved answer per input: text segments and [`GILLImage`] objects in the order produced.
    """

    outputs: list[list[Union[str, GILLImage]]]

    @property
    def texts(self) -> list[str]:
        """All text of each answer, joined."""
        return ["".join(x for x in answer if isinstance(x, str)) for answer in self.outputs]

    @property
    def images(self) -> list[list[GILLImage]]:
        """All image objects of each answer."""
        return self.gill_images

    @property
    def gill_images(self) -> list[list[GILLImage]]:
        """The [`GILLImage`] objects of each answer, in order."""
        return [[x for x in answer if isinstance(x, GILLImage)] for answer in self.outputs]

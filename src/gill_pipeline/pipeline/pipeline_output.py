from dataclasses import dataclass, field, fields
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
        nsfw_content_detected (`bool`, *optional*):
            With a safety checker set (`pipe.set_safety_checker`), whether it flagged this image (then `image` is
            what the checker returned in its place); None when no checker ran.
    """

    image: Any
    source: str
    decision_probs: tuple[float, float] | None = None
    scores: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)
    prompt_embeds_index: int = 0
    metadata: dict = field(default_factory=dict)
    alternatives: list["GILLImage"] = field(default_factory=list)
    nsfw_content_detected: bool | None = None


@dataclass
class GILLPipelineOutput(BaseOutput):
    r"""
    Output of [`GILLPipeline`].

    As in diffusers, `images` holds images: here every image shown in the answers, in order (answer 0's images, then
    answer 1's, ...), in the call's `output_type`. An answer may hold no image or several, so `outputs` keeps each
    answer whole and `gill_images` its [`GILLImage`] objects.

    With `return_dict=False` the pipeline returns the fields as a tuple in this fixed order: `(images, texts,
    outputs, warnings, messages, past, nsfw_content_detected)`, without the trailing fields that are None. The first
    four are always there (the tuple of earlier versions); `messages` is at position 4 and `past` at 5 whenever
    anything after them is set (None in their place when they are not).

    Args:
        images (`list`):
            The images shown, all answers in order: PIL images, numpy arrays or tensors (`output_type`).
        texts (`list[str]`):
            All text of each answer, joined.
        outputs (`list[list[str | GILLImage]]`):
            One interleaved answer per input: text segments and [`GILLImage`] objects (the image with its source,
            decision probabilities, scores, candidates and alternatives) in the order produced.
        warnings (`list[list[str]]`):
            Per answer, what did not go as asked (e.g. a retrieval set with no image left for an `[IMG]` group,
            which was then generated instead).
        messages (`list[dict]`, *optional*):
            For chat input: each answer as an assistant message in the transformers chat format (text parts, and
            image parts carrying what the `GILLImage` carries), ready to append to the conversation.
        past ([`GILLPast`], *optional*):
            For one chat input (or a call given `past=`): what the LM has read, to pass as `past=` to the next turn.
        nsfw_content_detected (`list[bool]`, *optional*):
            With a safety checker set, whether it flagged each image of `images` (as diffusers'
            `StableDiffusionPipelineOutput`); None when no checker ran.
    """

    images: list[Any]
    texts: list[str]
    outputs: list[list[Union[str, GILLImage]]]
    warnings: list[list[str]]
    messages: list[dict] | None = None
    past: Any = None
    nsfw_content_detected: list[bool] | None = None

    @classmethod
    def from_answers(
        cls,
        outputs: list[list[Union[str, GILLImage]]],
        warnings: list[list[str]] | None = None,
        messages: list[dict] | None = None,
        past: Any = None,
    ):
        shown = [x for answer in outputs for x in answer if isinstance(x, GILLImage)]
        flags = [x.nsfw_content_detected for x in shown]
        return cls(
            images=[x.image for x in shown],
            texts=["".join(x for x in answer if isinstance(x, str)) for answer in outputs],
            outputs=outputs,
            warnings=warnings if warnings is not None else [[] for _ in outputs],
            messages=messages,
            past=past,
            nsfw_content_detected=flags if any(flag is not None for flag in flags) else None,
        )

    def to_tuple(self) -> tuple:
        """The fields in their fixed order, without the trailing ones that are None (see the class docstring)."""
        values = [getattr(self, f.name) for f in fields(self)]
        while len(values) > 4 and values[-1] is None:
            values.pop()
        return tuple(values)

    @property
    def gill_images(self) -> list[list[GILLImage]]:
        """The [`GILLImage`] objects of each answer, in order."""
        return [[x for x in answer if isinstance(x, GILLImage)] for answer in self.outputs]

"""How an image of GILL's answer is shown to a person: a one-line description and an enlarged PNG for the page."""

import os

import PIL.Image

# Images of small models (the shapes world's are 32 px) are enlarged for display, by a whole factor with nearest-
# neighbour sampling so that no detail is invented; the file the chat CLI writes keeps the original size.
DISPLAY_MIN_SIZE = 128


def describe_image(image) -> str:
    """'generated image, p(generate)=0.71, p(retrieve)=0.29' (+ the retrieved record's caption) for a `GILLImage`."""
    words = [f"{image.source} image"]
    if image.decision_probs is not None:
        p_generate, p_retrieve = image.decision_probs
        words.append(f"p(generate)={p_generate:.2f}, p(retrieve)={p_retrieve:.2f}")
    caption = (image.metadata or {}).get("caption")
    if caption:
        words.append(f"retrieved caption {caption!r}")
    return ", ".join(words)


def to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    raise TypeError(f"`image` must be a PIL image (call the pipeline with output_type='pil'), got {type(image).__name__}.")


def save_for_display(image, folder: str, name: str, min_size: int = DISPLAY_MIN_SIZE) -> str:
    """Writes `image` as `folder/name.png`, enlarged to at least `min_size` px on its short side; returns the path."""
    pil = to_pil(image).convert("RGB")
    factor = max(1, -(-min_size // min(pil.size)))
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), PIL.Image.Resampling.NEAREST)
    path = os.path.join(folder, f"{name}.png")
    pil.save(path)
    return path

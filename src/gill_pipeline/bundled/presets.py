"""The built-in models `gill` accepts by name, and the call settings each one is best used with.

`SHAPES_MODEL` is the bundled shapes-world GILL (this package, docs/shapes_world.md); `RANDOM_MODEL` is a tiny pipeline
with random weights built from configs (`gill_pipeline.testing`), for trying the commands without any download. A preset
gives the prompt used when no items are given and settings keyed by the option names of
`gill_pipeline.demo.settings.CALL_ARGUMENTS`; `gill generate`, `gill chat`, `gill demo` and `gill evaluate` read them
where the user set nothing.
"""

from PIL import Image, ImageDraw

from . import BUNDLED_EXAMPLE_IMAGE

SHAPES_MODEL = "shapes-world"
RANDOM_MODEL = "tiny-random"
# The prompt item that stands for the model's example image (`example_image`).
EXAMPLE_IMAGE_ITEM = "@example-image"
PRESETS = {
    SHAPES_MODEL: dict(
        # An image of the world in; GILL describes it (the world's captions are 7 words), then answers with an image:
        # retrieved and generated ("both"); the decision head, overruled by the retrieval set's similarity floor,
        # picks the one shown. A mild [IMG0] boost (2) lets the [IMG] group come right after the description, and
        # 8 new tokens stop the answer there.
        prompt=[EXAMPLE_IMAGE_ITEM],
        settings=dict(
            max_new_tokens=8, min_text_tokens=0, img_logit_scale=2.0, max_images=1, image_mode="both", steps=20,
            guidance_scale=5.0,
        ),
    ),
    # Random weights: the random LM would rarely pick [IMG0] itself, so an image is made likely after a few words.
    RANDOM_MODEL: dict(
        prompt=["This is my dog.", EXAMPLE_IMAGE_ITEM, "Show me what he would look like in the snow."],
        settings=dict(min_text_tokens=4, img_logit_scale=100.0, max_images=1),
    ),
}


def example_image(model: str = RANDOM_MODEL) -> Image.Image:
    """The default example's input image: a picture of the shapes world for the bundled model, else a small drawn
    'dog' (a brown blob on grass). No file is needed for the latter."""
    if model == SHAPES_MODEL:
        with Image.open(BUNDLED_EXAMPLE_IMAGE) as image:
            return image.convert("RGB")
    image = Image.new("RGB", (64, 64), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 44, 63, 63], fill=(70, 150, 60))
    draw.ellipse([16, 26, 44, 46], fill=(120, 80, 40))
    draw.ellipse([38, 20, 52, 34], fill=(120, 80, 40))
    return image

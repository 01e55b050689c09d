"""An "image-captioning" pipeline task: image-text-to-text where the text is optional."""

from __future__ import annotations

from transformers import AutoModelForImageTextToText, GenerationConfig
from transformers.image_utils import is_valid_image
from transformers.pipelines import PIPELINE_REGISTRY, ImageTextToTextPipeline


class ImageCaptioningPipeline(ImageTextToTextPipeline):
    """
    Captions images with any image-text-to-text model; an image alone gets a caption.

    transformers 5 routes the "image-to-text" task to "image-text-to-text", which asks for a text argument. This
    task fills in an empty prompt, so `pipeline("image-captioning", model=...)(image)` needs nothing else; a
    `text=` prompt is still passed through for the caption to continue.

    Example:

    ```python
    >>> import clipcap_hf
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="path/to/clipcap")
    >>> captioner("photo.jpg", max_new_tokens=20)
    [{'input_text': '', 'generated_text': 'A dog runs on the beach.'}]
    ```
    """

    # No pipeline defaults: the model's generation config decides the caption length. (image-text-to-text's own
    # 256-token default would override it on transformers 4.x.)
    _default_generation_config = GenerationConfig()

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is None and not isinstance(images, dict):  # a dict holds its own text
            if isinstance(images, str) or is_valid_image(images):
                text = ""
            elif isinstance(images, (list, tuple)):
                text = [""] * len(images)
            else:  # a generator or a dataset of images, streamed as image-text-to-text reads them
                images = ({"images": image, "text": ""} for image in images)
        return super().__call__(images=images, text=text, **kwargs)


PIPELINE_REGISTRY.register_pipeline(
    "image-captioning",
    pipeline_class=ImageCaptioningPipeline,
    pt_model=AutoModelForImageTextToText,
    type="multimodal",
)

__all__ = ["ImageCaptioningPipeline"]

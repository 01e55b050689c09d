"""clipcap_hf: ClipCap (CLIP prefix image captioning) as a native Hugging Face transformers model.

Importing the package registers the "clipcap" model type with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoImageProcessor`, `AutoProcessor` and `pipeline()`
load ClipCap folders without `trust_remote_code`. It imports only what that needs (torch and transformers): the data,
training, evaluation and conversion code are subpackages, imported when used.
"""

import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoVideoProcessor,
)

from .configuration_clipcap import ClipCapConfig
from .image_processing_clipcap import ClipCapImageProcessor
from .modeling_clipcap import (
    ClipCapCausalLMOutputWithPast,
    ClipCapForConditionalGeneration,
    ClipCapForImageToText,
    ClipCapImageOutput,
    ClipCapMLPMapper,
    ClipCapPreTrainedModel,
    ClipCapTransformerMapper,
)
from .onednn import onednn_linear
from .open_clip_vision import ClipCapOpenClipVisionModel
from .pipeline_clipcap import ImageCaptioningPipeline
from .processing_clipcap import ClipCapProcessor

__version__ = "0.1.0"

AutoConfig.register(ClipCapConfig.model_type, ClipCapConfig, exist_ok=True)
AutoModel.register(ClipCapConfig, ClipCapForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(ClipCapConfig, ClipCapForConditionalGeneration, exist_ok=True)
if int(transformers.__version__.split(".")[0]) >= 5:
    # transformers 5 picks an image processor by backend, torchvision when installed (open_clip installs it), and
    # warns on every load when there is none for it. Ours has one implementation, for either backend.
    backends = {"pil": ClipCapImageProcessor, "torchvision": ClipCapImageProcessor}
    AutoImageProcessor.register(ClipCapConfig, image_processor_classes=backends, exist_ok=True)
    # ClipCap has no video processor. transformers 5's pipelines look for one all the same; in a folder saved under
    # 4.x, they take the image processor's `auto_map` entry for one (`ClipCapVideoProcessor`, which exists nowhere)
    # and, finding no local class, ask at the terminal whether to run the folder's code. Registered as transformers
    # registers a video processor whose backend is missing (None): the folder is then known locally, no code of it
    # runs, and the pipeline goes on without a video processor.
    AutoVideoProcessor.register(ClipCapConfig, video_processor_classes={"torchvision": None}, exist_ok=True)
else:
    AutoImageProcessor.register(ClipCapConfig, slow_image_processor_class=ClipCapImageProcessor, exist_ok=True)
AutoProcessor.register(ClipCapConfig, ClipCapProcessor, exist_ok=True)
if hasattr(transformers, "AutoModelForVision2Seq"):  # transformers 4.x: the image-to-text pipeline's class
    transformers.AutoModelForVision2Seq.register(ClipCapConfig, ClipCapForImageToText, exist_ok=True)

# Saved folders also carry the code and an `auto_map`, so they load with `trust_remote_code=True` where this
# package is not installed.
ClipCapConfig.register_for_auto_class()
ClipCapForConditionalGeneration.register_for_auto_class("AutoModel")
ClipCapImageProcessor.register_for_auto_class("AutoImageProcessor")
ClipCapProcessor.register_for_auto_class("AutoProcessor")


def __getattr__(name: str):
    # The converter is a one-off tool: loaded when it is asked for, not by every `import clipcap_hf`.
    if name == "convert_original_checkpoint":
        from .conversion.convert_original import convert_original_checkpoint

        return convert_original_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClipCapCausalLMOutputWithPast",
    "ClipCapConfig",
    "ClipCapForConditionalGeneration",
    "ClipCapForImageToText",
    "ClipCapImageOutput",
    "ClipCapImageProcessor",
    "ClipCapMLPMapper",
    "ClipCapOpenClipVisionModel",
    "ClipCapPreTrainedModel",
    "ClipCapProcessor",
    "ClipCapTransformerMapper",
    "ImageCaptioningPipeline",
    "convert_original_checkpoint",
    "onednn_linear",
]

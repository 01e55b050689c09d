"""A Gradio web demo: caption an uploaded image and show how the model reads its prefix.

Run it with `clipcap demo --model DIR` (needs `pip install "clipcap_hf[demo]"`), or build the app in Python, e.g. in a
Hugging Face Space's `app.py`:

```python
from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands.demo import build_demo

model = ClipCapForConditionalGeneration.from_pretrained("org/clipcap-coco").eval()
processor = ClipCapProcessor.from_pretrained("org/clipcap-coco")
build_demo(model, processor, examples=["dog.jpg"]).launch()
```
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..image_processing_clipcap import load_image, to_rgb_image
from ..inference.captioner import check_decoding_options
from ..modeling_clipcap import caption_length
from ._utils import (
    check_top_k_fits_vocabulary,
    expand_image_paths,
    load_model_and_processor,
    port_number,
    positive_int,
)

if TYPE_CHECKING:
    import gradio
    import PIL.Image

    from ..interpretability import PrefixInterpretation
    from ..modeling_clipcap import ClipCapForConditionalGeneration
    from ..processing_clipcap import ClipCapProcessor

DECODING_STRATEGIES = ("greedy", "beam search")
# The formats an upload is read in: PIL hands others to other programs (EPS to Ghostscript), which a page served to
# strangers should not run on their files.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_UPLOAD_SIZE = "50mb"


def import_gradio():
    """Import Gradio, with telemetry and update checks off (they would call out to the network on every start)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            'The web demo needs Gradio: `pip install "clipcap_hf[demo]"` (or `pip install gradio`).'
        ) from error
    return gradio


def load_user_image(image_path: str | os.PathLike | None) -> PIL.Image.Image:
    """
    Open an uploaded image file as the model sees it (upright 8-bit RGB, transparency on white), so that the preview
    shows what is captioned; a file that is not an image raises a `ValueError` naming it.
    """
    if image_path is None:
        raise ValueError("Upload an image or pick an example first.")
    path = Path(image_path)
    try:
        return to_rgb_image(load_image(path, formats=UPLOAD_FORMATS))
    except ValueError as error:
        # Uploads are stored under a temporary folder; the user knows the file by its name only. A path without a
        # name (".") is kept as it is: replacing it would also cut every "." out of the message.
        message = str(error).replace(str(path), path.name) if path.name else str(error)
        if type(error.__cause__).__name__ == "UnidentifiedImageError":  # not in a format it reads
            message += f" (the demo reads {', '.join(UPLOAD_FORMATS)} images)"
        raise ValueError(message) from None


def caption_and_interpret(
    model: ClipCapForConditionalGeneration,
    processor: ClipCapProcessor,
    image_path: str | os.PathLike | None,
    decoding: str = "greedy",
    num_beams: int = 5,
    num_captions: int = 1,
    max_new_tokens: int | None = None,
    top_k: int = 5,
) -> tuple[list[str], PrefixInterpretation]:
    """
    Caption one image file and interpret its prefix; what the demo's button does.

    Args:
        image_path: the image file.
        decoding: `"greedy"` (one caption) or `"beam search"`.
        num_beams: beams for beam search.
        num_captions: how many of the best beams to return (beam search only).
        max_new_tokens: the longest caption, in tokens; by default the model's generation config decides.
        top_k: nearest tokens shown per prefix vector.

    Raises:
        `ValueError` with a message meant for the user: no image, a file that is not an image, or settings that do not
        go together.
    """
    if decoding not in DECODING_STRATEGIES:
        raise ValueError(f"Decoding must be one of {', '.join(DECODING_STRATEGIES)}, got {decoding!r}.")
    num_beams, num_captions = int(num_beams), int(num_captions)
    length = {} if max_new_tokens is None else {"max_new_tokens": int(max_new_tokens)}
    if num_captions < 1:
        raise ValueError(f"The number of captions must be at least 1, got {num_captions}.")
    if decoding == "greedy":
        num_beams = 1
    try:
        check_decoding_options(num_beams=num_beams, num_return_sequences=num_captions)
    except ValueError:  # more captions than the beams give (the only rule these settings can break), in our terms
        if decoding == "greedy":
            raise ValueError("Greedy decoding gives exactly one caption; choose beam search for more.") from None
        raise ValueError(
            f"Beam search with {num_beams} beams gives at most {num_beams} captions, not {num_captions}."
        ) from None
    image = load_user_image(image_path)

    inputs = processor(images=[image]).to(model.device)
    generated = model.generate(
        **inputs,
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_captions,
        **length,
    )
    captions = processor.post_process_image_text_to_text(generated)
    interpretation = model.interpret_prefix(inputs["pixel_values"], tokenizer=processor, top_k=top_k)[0]
    return captions, interpretation


def _caption_length_range(model: ClipCapForConditionalGeneration) -> tuple[int, int]:
    """
    Where the length slider starts, the model's own caption length (67 for converted paper checkpoints), and where it
    ends: 100 tokens or that length if longer, but no more than the positions the language model has left after the
    prefix (a longer setting could only fail).
    """
    # However the generation config sets it (`max_new_tokens`, or a `max_length` that counts the image tokens).
    length = caption_length(model.generation_config, model.config.prefix_length)
    longest = max(100, length)
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    if isinstance(context, int):
        longest = min(longest, context - model.config.prefix_length)
    return min(length, longest), longest


def build_demo(
    model: ClipCapForConditionalGeneration,
    processor: ClipCapProcessor,
    examples: Sequence[str | os.PathLike] = (),
    top_k: int = 5,
    title: str = "ClipCap image captioning",
) -> gradio.Blocks:
    """
    The demo app: an image (uploaded or picked from `examples`), decoding settings, and a button that shows the
    captions and the prefix interpretation (each prefix vector's `top_k` nearest tokens).

    Launch it with `.launch()`; `clipcap demo` serves it on 127.0.0.1 unless told otherwise.
    """
    gr = import_gradio()

    def run_or_report(function, *args):
        # A `ValueError` means bad input. Gradio shows the user a `gr.Error`'s message, and a bare "Error" otherwise.
        try:
            return function(*args)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def preview(image_path):
        # Decoding the upload right away shows a bad file's error before anyone presses the button.
        return None if image_path is None else run_or_report(load_user_image, image_path)

    def run(image_path, decoding, num_beams, num_captions, max_new_tokens):
        captions, interpretation = run_or_report(
            caption_and_interpret,
            model,
            processor,
            image_path,
            decoding,
            num_beams,
            num_captions,
            max_new_tokens,
            top_k,
        )
        rows = [
            [position, *(f"{match.label} {match.similarity:.3f}" for match in candidates)]
            for position, candidates in enumerate(interpretation.matches)
        ]
        return "\n".join(captions), rows

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nUpload an image (or pick an example) and press **Caption**. The table reads the image's "
            "prefix back as words: for each prefix vector, the language model tokens whose embeddings are closest."
        )
        with gr.Row():
            with gr.Column():
                # A plain file input, not `gr.Image` nor a file-type filter: every upload reaches `load_user_image`, so
                # a file that is not an image gets a message naming it and saying why, not Gradio's bare "Error".
                image = gr.File(label="Image", type="filepath", elem_id="image")
                image_preview = gr.Image(label="Preview", interactive=False, height=240, elem_id="preview")
                decoding = gr.Radio(list(DECODING_STRATEGIES), value="greedy", label="Decoding", elem_id="decoding")
                num_beams = gr.Slider(1, 10, value=5, step=1, label="Beams (beam search)", elem_id="num-beams")
                captions_label = "Number of captions (beam search: the best beams)"
                num_captions = gr.Slider(1, 10, value=1, step=1, label=captions_label, elem_id="num-captions")
                length, longest = _caption_length_range(model)
                max_new_tokens = gr.Slider(
                    1, longest, value=length, step=1, label="Max length (tokens)", elem_id="max-length"
                )
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image], label="Examples")
            with gr.Column():
                captions = gr.Textbox(label="Captions", lines=3, interactive=False, elem_id="captions")
                interpretation = gr.Dataframe(
                    headers=["prefix", *(f"top {rank + 1}" for rank in range(top_k))],
                    label="Prefix interpretation (nearest tokens, cosine similarity)",
                    interactive=False,
                    elem_id="interpretation",
                )
        image.change(preview, inputs=[image], outputs=[image_preview])
        button.click(
            run,
            inputs=[image, decoding, num_beams, num_captions, max_new_tokens],
            outputs=[captions, interpretation],
        )
    return demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    parser.add_argument("--examples", nargs="*", default=[], help="Example images: files, folders or glob patterns.")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="Nearest tokens shown per prefix vector (default: 5).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on; 0.0.0.0 exposes the demo.")
    parser.add_argument("--port", type=port_number, default=None, help="Default: the first free port from 7860.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")


def run(args: argparse.Namespace) -> int:
    import_gradio()  # fail before loading the model when Gradio is missing
    examples = expand_image_paths(args.examples) if args.examples else []
    model, processor = load_model_and_processor(args.model, args.device)
    check_top_k_fits_vocabulary(args.top_k, model, processor)  # or every click after the launch would fail
    demo = build_demo(model, processor, examples=examples, top_k=args.top_k, title=f"ClipCap: {args.model}")
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=MAX_UPLOAD_SIZE)
    return 0

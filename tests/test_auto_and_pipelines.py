import json

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import (
    IMAGE_SIZE,
    build_tokenizer,
    distinct_captioning_model,
    random_images,
    run_without_package,
    tiny_config,
    tiny_model,
    tiny_processor,
)
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionModelWithProjection,
    GPT2LMHeadModel,
    pipeline,
)
from transformers.pipelines.pt_utils import KeyDataset
from transformers.testing_utils import CaptureLogger

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration, ClipCapImageProcessor, ClipCapProcessor

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def captions_from_generate(folder, images, **generate_kwargs):
    model = ClipCapForConditionalGeneration.from_pretrained(folder).eval()
    processor = ClipCapProcessor.from_pretrained(folder)
    generated = model.generate(**processor(images=images), **generate_kwargs)
    return [caption.strip() for caption in processor.batch_decode(generated, skip_special_tokens=True)]


def test_auto_classes_load_a_saved_folder(saved_model_dir):
    assert type(AutoConfig.from_pretrained(saved_model_dir)) is ClipCapConfig
    assert type(AutoModel.from_pretrained(saved_model_dir)) is ClipCapForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(saved_model_dir)) is ClipCapForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(saved_model_dir)) is ClipCapProcessor


def test_auto_image_processor_loads_ours_without_asking_for_torchvision(saved_model_dir):
    # transformers 5 asks for the torchvision backend when torchvision is installed (open_clip installs it); with
    # ours registered for "pil" only, it warned on every load that the backend "is not available".
    with CaptureLogger(transformers.utils.logging.get_logger("transformers")) as captured:
        assert type(AutoImageProcessor.from_pretrained(saved_model_dir)) is ClipCapImageProcessor
    assert "torchvision" not in captured.out


def test_saved_folder_carries_code_and_auto_map(saved_model_dir):
    config = json.loads((saved_model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_clipcap.ClipCapForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_clipcap.ClipCapConfig"
    for module in ("modeling_clipcap.py", "configuration_clipcap.py", "processing_clipcap.py",
                   "image_processing_clipcap.py", "open_clip_vision.py", "onednn.py"):
        assert (saved_model_dir / module).exists(), module


def test_trust_remote_code_loads_without_the_package(saved_model_dir, tmp_path):
    images = random_images(2)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=8)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    output = run_without_package(
        f"""
        import json, sys
        import PIL.Image
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
        folder = {str(saved_model_dir)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)  # first: it brings its own code
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        images = [PIL.Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(2)]
        generated = model.generate(**processor(images=images), max_new_tokens=8)
        captions = [c.strip() for c in processor.batch_decode(generated, skip_special_tokens=True)]
        image_text_to_text = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        piped = [captioner(images=image, text="", max_new_tokens=8)[0]["generated_text"].strip() for image in images]
        assert not any(name.startswith("clipcap_hf") for name in sys.modules)
        print(json.dumps({{"captions": captions, "model": type(model).__module__,
                          "image_text_to_text": type(image_text_to_text).__name__, "piped": piped}}))
        """,
        tmp_path,
    )
    assert output["captions"] == expected
    assert output["model"].startswith("transformers_modules")
    assert output["image_text_to_text"] == "ClipCapForConditionalGeneration"
    assert output["piped"] == expected


def as_saved_by_transformers_4(folder):
    """The processor files of a saved folder laid out as transformers 4.57 writes them: the image processor's settings,
    with its `auto_map`, in preprocessor_config.json (transformers 5 nests them in processor_config.json)."""
    processor_config = json.loads((folder / "processor_config.json").read_text())
    image_processor = processor_config.pop("image_processor", None)
    if image_processor is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor_config))
        image_processor["processor_class"] = "ClipCapProcessor"
        (folder / "preprocessor_config.json").write_text(json.dumps(image_processor))
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_clipcap.ClipCapImageProcessor"
    return folder


@pytest.mark.parametrize("task", ["image-captioning", "image-text-to-text"])
def test_pipeline_of_a_folder_saved_under_transformers_4_neither_asks_nor_runs_its_code(
    saved_model_dir, tmp_path, monkeypatch, task, quiet_transformers
):
    # transformers 5's pipelines look for a video processor too; from the image processor's `auto_map` of a 4.57
    # folder they made up `image_processing_clipcap.ClipCapVideoProcessor`, found no local class and asked at the
    # terminal whether to run the folder's code (stdin closed: an error, swallowed; "y": the folder's code ran).
    folder = as_saved_by_transformers_4(saved_model_dir)
    marker = tmp_path / "folder_code_ran"
    for module in ("image_processing_clipcap.py", "processing_clipcap.py"):
        (folder / module).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nraise RuntimeError\n")
    questions = []

    def closed_stdin(prompt=""):
        questions.append(prompt)
        raise EOFError

    monkeypatch.setattr("builtins.input", closed_stdin)
    images = random_images(2, seed=3)
    expected = captions_from_generate(folder, images, max_new_tokens=6)
    captioner = pipeline(task, model=str(folder))
    kwargs = {"text": ""} if task == "image-text-to-text" else {}
    captions = [captioner(images=image, max_new_tokens=6, **kwargs)[0]["generated_text"].strip() for image in images]
    assert questions == []
    assert not marker.exists()
    assert type(captioner.processor) is ClipCapProcessor and getattr(captioner, "video_processor", None) is None
    assert captions == expected


@pytest.fixture
def quiet_transformers():
    # transformers 5's "image-to-text has been replaced" warning has a formatting bug that turns into an
    # exception under pytest's log capture; only errors are logged during these tests.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    yield
    transformers.utils.logging.set_verbosity(verbosity)


@pytest.mark.parametrize("task", ["image-text-to-text", "image-to-text", "image-captioning"])
def test_pipelines_equal_generate(saved_model_dir, task, quiet_transformers):
    images = random_images(3, seed=4)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=8, num_beams=2)
    captioner = pipeline(task, model=str(saved_model_dir))
    needs_text = task == "image-text-to-text" or (task == "image-to-text" and TRANSFORMERS_5)
    for image, caption in zip(images, expected):
        kwargs = {"text": ""} if needs_text else {}
        if task == "image-to-text" and not TRANSFORMERS_5:
            output = captioner(image, generate_kwargs={"max_new_tokens": 8, "num_beams": 2})
        else:
            output = captioner(images=image, max_new_tokens=8, generate_kwargs={"num_beams": 2}, **kwargs)
        assert output[0]["generated_text"].strip() == caption


@pytest.mark.parametrize(
    "task",
    [
        pytest.param(
            "image-text-to-text",
            marks=pytest.mark.skipif(not TRANSFORMERS_5, reason="4.x pipelines put their own length first"),
        ),
        "image-captioning",
    ],
)
def test_pipeline_defaults_equal_generate_defaults(saved_model_dir, task, quiet_transformers):
    images = random_images(2, seed=6)
    expected = captions_from_generate(saved_model_dir, images)  # the model's own caption length
    captioner = pipeline(task, model=str(saved_model_dir))
    kwargs = {"text": ""} if task == "image-text-to-text" else {}
    assert [captioner(images=image, **kwargs)[0]["generated_text"].strip() for image in images] == expected


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 5's image-to-text is image-text-to-text, with the processor")
def test_image_to_text_pipeline_prompt_equals_the_image_captioning_pipelines(saved_model_dir, quiet_transformers):
    images = random_images(2, seed=9)
    image_to_text = pipeline("image-to-text", model=str(saved_model_dir))
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    for image in images:
        expected = captioner(image, text="A dog", max_new_tokens=4)[0]["generated_text"]
        assert expected.startswith("A dog") and expected != "A dog"
        output = image_to_text(image, prompt="A dog", generate_kwargs={"max_new_tokens": 4})
        assert output == [{"generated_text": expected}]


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 5's image-to-text is image-text-to-text, with the processor")
def test_image_to_text_pipeline_prompt_drops_the_bos_a_tokenizer_adds(tmp_path, quiet_transformers):
    # 4.57's pipeline tokenizes `prompt=` with special tokens: a tokenizer that adds a BOS (OPT's, Llama's) put it
    # between the image tokens and the prompt, which the processor leaves out.
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert tokenizer("A dog")["input_ids"][0] == bos
    tiny_model(tokenizer).save_pretrained(tmp_path)
    tiny_processor(tokenizer).save_pretrained(tmp_path)
    image = random_images(1, seed=9)[0]
    first_inputs = []
    for task, kwargs in (("image-to-text", {"prompt": "A dog", "generate_kwargs": {"max_new_tokens": 4}}),
                         ("image-captioning", {"text": "A dog", "max_new_tokens": 4})):
        captioner = pipeline(task, model=str(tmp_path))
        seen = []
        captioner.model.register_forward_pre_hook(lambda module, args, inputs: seen.append(inputs), with_kwargs=True)
        text = captioner(image, **kwargs)[0]["generated_text"]
        first_inputs.append((text, seen[0]["input_ids"], seen[0]["attention_mask"]))
    (text, input_ids, attention_mask), (expected_text, expected_ids, expected_mask) = first_inputs
    assert bos not in input_ids.tolist()[0]
    assert input_ids.tolist() == expected_ids.tolist()
    assert attention_mask.tolist() == expected_mask.tolist()
    assert text == expected_text


def generate_batch_sizes(captioner, monkeypatch):
    """The batch size of every generate call the pipeline makes from now on."""
    sizes, generate = [], captioner.model.generate

    def counting_generate(**inputs):
        sizes.append(len(inputs["pixel_values"]))
        return generate(**inputs)

    monkeypatch.setattr(captioner.model, "generate", counting_generate)
    return sizes


def test_image_captioning_pipeline_takes_an_image_alone_and_batches_lists(saved_model_dir, monkeypatch):
    images = random_images(3, seed=5)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=6)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    assert captioner(images[0], max_new_tokens=6) == [{"input_text": "", "generated_text": expected[0]}]
    assert captioner({"images": images[1]}, max_new_tokens=6) == [{"input_text": "", "generated_text": expected[1]}]
    batch_sizes = generate_batch_sizes(captioner, monkeypatch)
    # A list gives one list of captions per image, as transformers' image-to-text pipeline does, batch by batch.
    outputs = captioner(images, max_new_tokens=6, batch_size=2)
    assert outputs == [[{"input_text": "", "generated_text": caption}] for caption in expected]
    assert batch_sizes == [2, 1]


@pytest.mark.parametrize("as_generator", [False, True])
def test_image_captioning_pipeline_gives_every_image_its_return_sequences(saved_model_dir, as_generator):
    images = random_images(3, seed=7)
    settings = {"num_beams": 3, "num_return_sequences": 2}
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=5, **settings)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    source = (image for image in images) if as_generator else images
    outputs = list(captioner(source, max_new_tokens=5, generate_kwargs=settings, batch_size=2))
    assert [[output["generated_text"] for output in per_image] for per_image in outputs] == [
        expected[0:2], expected[2:4], expected[4:6]
    ]
    assert captioner(images[0], max_new_tokens=5, generate_kwargs=settings) == [
        {"input_text": "", "generated_text": caption} for caption in expected[0:2]
    ]


def test_image_captioning_pipeline_prompts_every_image_of_a_list(saved_model_dir):
    images = random_images(3, seed=8)
    model = ClipCapForConditionalGeneration.from_pretrained(saved_model_dir).eval()
    processor = ClipCapProcessor.from_pretrained(saved_model_dir)

    def continuation(image, prompt):
        inputs = processor(images=[image], text=prompt)
        generated = model.generate(**inputs, max_new_tokens=4)[:, inputs["input_ids"].shape[1]:]
        return prompt + processor.decode(generated[0], skip_special_tokens=True)

    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    for prompts in ("A", ["A", "The", "A"]):
        per_image = prompts if isinstance(prompts, list) else [prompts] * 3
        outputs = captioner(images, text=prompts, max_new_tokens=4, batch_size=2)
        assert outputs == [
            [{"input_text": prompt, "generated_text": continuation(image, prompt)}]
            for image, prompt in zip(images, per_image)
        ]
    with pytest.raises(ValueError, match="Got 2 prompts for 3 images: give one prompt per image"):
        captioner(images, text=["A", "The"])


def test_image_captioning_pipeline_streams_generators_and_datasets(saved_model_dir):
    images = random_images(3, seed=5)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=6)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    sources = [(image for image in images), KeyDataset(dataset, "image"), ({"images": image} for image in images)]
    for source in sources:
        outputs = captioner(source, max_new_tokens=6, batch_size=2)
        assert [output[0]["generated_text"] for output in outputs] == expected


def test_image_captioning_pipeline_reads_path_objects_and_refuses_a_dict_without_images(saved_model_dir, tmp_path):
    images = random_images(2, seed=5)
    paths = [tmp_path / f"{index}.png" for index in range(2)]
    for image, path in zip(images, paths):
        image.save(path)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=6)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    assert captioner(paths[0], max_new_tokens=6) == [{"input_text": "", "generated_text": expected[0]}]
    assert captioner({"images": paths[1]}, max_new_tokens=6) == [{"input_text": "", "generated_text": expected[1]}]
    outputs = captioner(paths, max_new_tokens=6, batch_size=2)
    assert [output[0]["generated_text"] for output in outputs] == expected
    message = (
        "Got a dict with keys ['image'] and no 'images': give an image (PIL image, array, tensor, path or URL), an "
        "{'images': image, 'text': prompt} dict, or a list, generator or dataset of these."
    )
    with pytest.raises(ValueError) as error:
        captioner({"image": images[0]}, max_new_tokens=6)
    assert str(error.value) == message
    dataset = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    with pytest.raises(ValueError) as error:  # its rows, not its image column (KeyDataset(dataset, "image"))
        list(captioner(dataset, max_new_tokens=6))
    assert str(error.value) == message
    # Text alone reached the model as image tokens without an image, refused as "pass `pixel_values`".
    for text in ("A dog", ["A dog", "A cat"]):
        with pytest.raises(ValueError, match=r"^The image-captioning pipeline captions images, and got text alone: "
                                             r"give `images` \(a path, URL"):
            captioner(text=text, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"^The image-captioning pipeline captions images, and got nothing: give"):
        captioner(max_new_tokens=6)


@pytest.mark.parametrize(
    "call, message",
    [
        # Iterated as a stream of images: "'int' object is not iterable".
        (dict(images=5), "`images` must be an image (a path, URL, PIL image, array or tensor), an {'images': image, "
                         "'text': prompt} dict, or a list, generator or dataset of these; got int (5)."),
        (dict(images=b"\x89PNG"), "`images` must be an image (a path, URL, PIL image, array or tensor), an {'images': "
                                  "image, 'text': prompt} dict, or a list, generator or dataset of these; got bytes "
                                  "(b'\\x89PNG')."),
        (dict(images=random_images(1)[0], text=5),
         "`text` must be a prompt (a string) for every image or a list of one per image, got int (5)."),
    ],
    ids=["images=5", "images=bytes", "text=5"],
)
def test_image_captioning_pipeline_names_arguments_of_the_wrong_type(saved_model_dir, call, message):
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    with pytest.raises(TypeError) as error:
        captioner(**call, max_new_tokens=2)
    assert str(error.value) == message


def test_image_captioning_pipeline_takes_a_datasets_column_of_prompts_as_a_list(saved_model_dir):
    import datasets
    import PIL.Image

    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    images = [PIL.Image.fromarray(np.full((32, 32, 3), value, np.uint8)) for value in (0, 200)]
    prompts = datasets.Dataset.from_dict({"prompt": ["a", "b"]})["prompt"]  # a Column in datasets 4+, not a list
    given = captioner(images, text=prompts, max_new_tokens=2)
    assert given == captioner(images, text=["a", "b"], max_new_tokens=2)
    assert [output[0]["input_text"] for output in given] == ["a", "b"]


def test_image_captioning_pipeline_converts_images_as_the_processor_does(saved_model_dir, tmp_path, monkeypatch):
    # transformers' image loading would flatten a transparent image's hidden colours and clip 16-bit values at 255.
    import PIL.Image

    pixels = np.zeros((40, 48, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[:, 24:, 3] = 255  # the left half fully transparent: white, not red
    transparent = PIL.Image.fromarray(pixels, "RGBA")
    sixteen_bit = PIL.Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 28).astype(np.uint16))
    sixteen_bit.save(tmp_path / "16-bit.png")
    processor = ClipCapProcessor.from_pretrained(saved_model_dir)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    seen = []
    generate = captioner.model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["pixel_values"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", recording_generate)
    for image in (transparent, tmp_path / "16-bit.png", str(tmp_path / "16-bit.png")):
        seen.clear()
        captioner(image, max_new_tokens=2)
        opened = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
        torch.testing.assert_close(seen[0], processor(images=[opened])["pixel_values"], rtol=0, atol=0)
    # A list with an entry that is no image: named, rather than taken for chat messages.
    for stray in (None, 3, b"not an image"):
        with pytest.raises(ValueError) as error:
            captioner([transparent, stray], max_new_tokens=2)
        assert str(error.value).startswith(f"images[1] is {type(stray).__name__} {stray!r}, not an image: give PIL")


def test_image_captioning_pipeline_takes_arrays_and_tensors_as_its_docstring_says(saved_model_dir):
    images = random_images(2, seed=8)
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=6)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    arrays = [np.asarray(image) for image in images]  # HWC uint8
    tensor = torch.from_numpy(arrays[0]).permute(2, 0, 1)  # CHW uint8
    assert captioner(arrays[0], max_new_tokens=6) == [{"input_text": "", "generated_text": expected[0]}]
    assert captioner(tensor, max_new_tokens=6) == [{"input_text": "", "generated_text": expected[0]}]
    outputs = captioner(arrays, max_new_tokens=6, batch_size=2)
    assert [output[0]["generated_text"] for output in outputs] == expected


def test_image_captioning_pipeline_captions_a_batched_array_or_tensor_image_by_image(tmp_path, tokenizer, processor):
    # A (N, H, W, C) array or (N, C, H, W) tensor is N images, as ClipCapProcessor reads it; it was read as one image
    # and refused ("Cannot read an image array of shape (2, 40, 48, 3)").
    distinct_captioning_model(tokenizer).save_pretrained(tmp_path)  # captions that differ from image to image
    processor.save_pretrained(tmp_path)
    images = random_images(2, seed=2)
    expected = captions_from_generate(tmp_path, images, max_new_tokens=6)
    assert expected[0] != expected[1]
    captioner = pipeline("image-captioning", model=str(tmp_path))
    batch = np.stack([np.asarray(image) for image in images])  # NHWC uint8
    per_image = captioner(list(batch), max_new_tokens=6)
    assert per_image == [[{"input_text": "", "generated_text": caption}] for caption in expected]
    assert captioner(batch, max_new_tokens=6) == per_image
    assert captioner(torch.from_numpy(batch).permute(0, 3, 1, 2), max_new_tokens=6, batch_size=2) == per_image
    prompts = ["A", "The"]
    assert captioner(batch, text=prompts, max_new_tokens=4) == captioner(list(batch), text=prompts, max_new_tokens=4)


def test_image_captioning_pipeline_takes_generation_options_as_its_own(saved_model_dir):
    images = random_images(2, seed=7)
    settings = {"num_beams": 3, "num_return_sequences": 2}
    expected = captions_from_generate(saved_model_dir, images, max_new_tokens=5, **settings)
    captioner = pipeline("image-captioning", model=str(saved_model_dir))
    outputs = captioner(images, max_new_tokens=5, batch_size=2, **settings)
    captions = [[output["generated_text"] for output in per_image] for per_image in outputs]
    assert captions == [expected[0:2], expected[2:4]]
    with pytest.raises(ValueError, match="`num_beams` was given both as an option and in `generate_kwargs`; give it"):
        captioner(images, num_beams=2, generate_kwargs={"num_beams": 2})


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x has a real image-to-text pipeline")
def test_image_text_to_text_without_text_says_so(saved_model_dir):
    captioner = pipeline("image-text-to-text", model=str(saved_model_dir))
    with pytest.raises(ValueError, match="You must provide text"):
        captioner(images=random_images(1)[0])


def test_image_text_to_text_given_a_lone_path_fails_instead_of_continuing_it_as_text(saved_model_dir, tmp_path):
    path = tmp_path / "dog.png"
    random_images(1)[0].save(path)
    captioner = pipeline("image-text-to-text", model=str(saved_model_dir))
    with pytest.raises(ValueError, match="image tokens but no image was given"):  # it reads the path as a prompt
        captioner(str(path), max_new_tokens=3)


def test_from_vision_text_pretrained_rejects_wrong_or_missing_parts(tmp_path, tokenizer):
    config = tiny_config(tokenizer)
    GPT2LMHeadModel(config.text_config).save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="text': `vision_config` describes a 'gpt2' model, which gives no single"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "text"), str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError, match="The vision model .*nowhere.* does not exist"):
        ClipCapForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "nowhere"), str(tmp_path / "text"))


def test_from_vision_text_pretrained_with_local_parts(tmp_path, tokenizer):
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(config.vision_config)
    language = GPT2LMHeadModel(config.text_config)
    vision.save_pretrained(tmp_path / "vision")
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}).save_pretrained(
        tmp_path / "vision"
    )
    language.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")

    model = ClipCapForConditionalGeneration.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), mapping_type="transformer", prefix_length=3,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    assert (model.config.mapping_type, model.config.prefix_length, model.config.prefix_dim) == ("transformer", 3, 24)
    for name, tensor in vision.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    for name, tensor in language.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in model.vision_model.parameters())

    processor = ClipCapProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"))
    assert (processor.image_processor.size, processor.image_processor.crop_size) == (40, 36)
    pixel_values = processor(images=random_images(1))["pixel_values"]
    assert pixel_values.shape == (1, 3, 36, 36)

    # A vision checkpoint without preprocessing config falls back to CLIP's, at the tower's image size.
    (tmp_path / "vision" / "preprocessor_config.json").unlink()
    fallback = ClipCapProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"))
    assert (fallback.image_processor.size, fallback.image_processor.crop_size) == (IMAGE_SIZE, IMAGE_SIZE)

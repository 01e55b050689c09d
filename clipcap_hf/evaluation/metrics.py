"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), as the COCO caption evaluation scores them.

The scores come from the scorers of `pycocoevalcap` (the Python 3 packaging of the official
[coco-caption](https://github.com/tylin/coco-caption) code), called directly, so they equal the published COCO
numbers: captions are PTB-tokenized (lower-cased, punctuation removed), BLEU is corpus-level with the "closest"
reference length, and CIDEr-D takes its document frequencies from the references of the scored images.

What each piece needs besides `pycocoevalcap` (`pip install "clipcap_hf[eval]"`):

- PTB tokenization: Java (it runs the Stanford CoreNLP 3.4.1 `PTBTokenizer` jar shipped with pycocoevalcap).
- METEOR: Java (it runs `meteor-1.5.jar`, the COCO METEOR; the METEOR of NLTK and `evaluate` gives other numbers).
- SPICE: Java 8 or 11 (SPICE 1.0 fails on Java 16+), the Stanford CoreNLP 3.6.0 jars, fetched once with
  `python -m pycocoevalcap.spice.get_stanford_models` (network needed; this module never downloads), and a
  writable pycocoevalcap folder (SPICE writes temporary files and a cache there).
- BLEU, ROUGE-L, CIDEr-D: Python only.

When a piece is missing, a warning names it and says how to fix it, and the other metrics are still computed.
Without Java, METEOR and SPICE are skipped and tokenization falls back to a Python approximation of the PTB
tokenizer, so BLEU, ROUGE_L and CIDEr are then close to, but not exactly, the official scores.

Example:

```python
>>> from clipcap_hf.evaluation.metrics import compute_caption_metrics, load_coco_predictions, load_coco_references
>>> references = load_coco_references("captions_val2014.json")
>>> predictions = load_coco_predictions("results.json")
>>> scores, per_image = compute_caption_metrics(predictions, references, return_per_image=True)
>>> scores["CIDEr"], per_image[391895]["CIDEr"]
```
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from ..utils.file_utils import read_json

ImageId = int | str

METRIC_NAMES: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider", "spice")
"""Metrics that `compute_caption_metrics` knows, in the order COCO reports them."""

SCORE_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
"""The result keys of each metric, named as COCOEvalCap names them."""

_INSTALL_JAVA = "Install a Java runtime (for example `apt-get install default-jre`) and make sure `java` is on PATH."

# Java's PTBTokenizer also ends a line at these; upstream only replaces "\n", so any other one would shift every
# later caption onto the wrong image.
_LINE_BREAKS = re.compile(r"[\n\r\v\f\u2028\u2029]")

# Python stand-in for the PTB tokenizer when Java is missing. It splits off what the PTB tokenizer splits off in
# captions (contractions, punctuation marks) and keeps hyphenated words, decimals, times, "o'clock", "!!!" and
# initialisms ("t.v.") whole; brackets become PTB's -lrb- style tokens, which the COCO code keeps.
_APPROX_TOKEN = re.compile(
    r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|m|d)\b|(?:\b\w\.){2,}"
    r"|\w+(?:[-./:]\w+|'(?!(?:s|re|ve|ll|m|d)\b)\w+)*|\.{2,}|-{2,}|[!?]{2,}|[^\w\s]"
)
_APPROX_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_APPROX_PUNCTUATION = frozenset(["'", '"', "`", ".", "..", "...", "?", "!", ",", ":", ";", "-", "--"])


def require_pycocoevalcap() -> None:
    """Raise an ImportError that says how to install pycocoevalcap when it is missing."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise ImportError(
            "COCO caption metrics need pycocoevalcap, the COCO caption evaluation code: "
            '`pip install "clipcap_hf[eval]"` (or `pip install pycocoevalcap==1.2`).'
        )


def _java_available() -> bool:
    # pycocoevalcap starts every jar as plain `java`, so PATH is what counts (not JAVA_HOME).
    return shutil.which("java") is not None


def _format_ids(ids: Sequence[ImageId], limit: int = 10) -> str:
    shown = ", ".join(repr(image_id) for image_id in ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in total)"


def _check_unicode(text: str, where: str) -> None:
    """Refuse lone surrogates ("\\udc9f" is valid JSON and a valid Python string, but not Unicode text): the UTF-8
    encoding for the Java tools would fail later with a message naming neither the file nor the image."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} holds the lone surrogate {text[error.start]!r} at position {error.start} (half of a surrogate "
            f"pair, such as an emoji cut in two): {text!r:.200}. Captions must be valid Unicode text."
        ) from None


def _read_entry(entry: Any, index: int, path: str | os.PathLike[str]) -> tuple[ImageId, str]:
    if isinstance(entry, dict):
        image_id, caption = entry.get("image_id"), entry.get("caption")
        if isinstance(image_id, (int, str)) and not isinstance(image_id, bool) and isinstance(caption, str):
            _check_unicode(caption, f"{path}: the caption of entry {index} (image id {image_id!r})")
            return image_id, caption
    raise ValueError(
        f"{path}: entry {index} must be an object with an integer or string 'image_id' and a string 'caption', "
        f"got {str(entry)[:200]}"
    )


def load_coco_references(path: str | os.PathLike[str]) -> dict[ImageId, list[str]]:
    """Load reference captions from a file in the COCO annotation format.

    Args:
        path: A UTF-8 JSON file such as `captions_val2014.json`: an object whose `"annotations"` list holds
            `{"image_id": ..., "caption": ...}` entries (other keys, such as `"images"`, are ignored).

    Returns:
        The captions of each image, in file order.

    Raises:
        ValueError: If the file is not UTF-8, not JSON, not in the COCO annotation format, or a caption holds a
            lone surrogate (such as "\\udc9f"); the message names the file (and the offending entry).
    """
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{path} is not in the COCO annotation format: expected an object with an 'annotations' list of "
            "{'image_id', 'caption'} entries."
        )
    references: dict[ImageId, list[str]] = {}
    for index, entry in enumerate(data["annotations"]):
        image_id, caption = _read_entry(entry, index, path)
        references.setdefault(image_id, []).append(caption)
    return references


def load_coco_predictions(path: str | os.PathLike[str]) -> dict[ImageId, str]:
    """Load generated captions from a file in the COCO results format.

    Args:
        path: A UTF-8 JSON file holding a list of `{"image_id": ..., "caption": ...}` entries, one per image
            (other keys are ignored).

    Returns:
        The caption of each image, in file order.

    Raises:
        ValueError: If the file is not UTF-8, not JSON, not in the COCO results format, has more than one
            caption for an image, or a caption holds a lone surrogate (such as "\\udc9f"); the message names the
            file and the image ids.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(
            f"{path} is not in the COCO results format: expected a list of {{'image_id', 'caption'}} entries."
        )
    predictions: dict[ImageId, str] = {}
    duplicates: dict[ImageId, None] = {}
    for index, entry in enumerate(data):
        image_id, caption = _read_entry(entry, index, path)
        if image_id in predictions:
            duplicates[image_id] = None
        predictions[image_id] = caption
    if duplicates:
        raise ValueError(
            f"{path} has more than one caption for {len(duplicates)} image id(s): {_format_ids(list(duplicates))}. "
            "The COCO caption evaluation scores one caption per image."
        )
    return predictions


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenize captions exactly as the COCO caption evaluation does. Needs Java.

    Runs the Stanford CoreNLP 3.4.1 `PTBTokenizer` shipped with pycocoevalcap (lower-casing, one caption per
    line) and drops the punctuation tokens that pycocoevalcap's `PTBTokenizer` drops (brackets survive as
    `-lrb-`, `-rrb-`, as they do there), in one Java call for all captions. Unlike pycocoevalcap's wrapper, it
    writes no temporary file into the installed package (so it works with a read-only site-packages), and it
    keeps captions with `\\r` or other line breaks on their own image.

    Args:
        captions: Raw captions.

    Returns:
        The tokenized captions, tokens separated by single spaces, in input order.

    Raises:
        OSError: If Java is missing (`FileNotFoundError`) or the tokenizer fails; the message is one line, naming the
            command and Java's error messages.
    """
    require_pycocoevalcap()
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not _java_available():
        raise FileNotFoundError(f"PTB tokenization runs the Stanford PTBTokenizer and needs Java. {_INSTALL_JAVA}")
    if not captions:
        return []
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
    process = subprocess.run(command, input=text.encode("utf-8"), capture_output=True)
    lines = process.stdout.decode("utf-8").split("\n")
    if process.returncode != 0 or len(lines) != len(captions):
        # An OSError, like any failing external tool, so that `clipcap` reports it in one line; Java's stack frames
        # (indented lines) are left out of the message.
        messages = [line for line in process.stderr.decode(errors="replace").splitlines() if line[:1].strip()]
        raise OSError(
            f"The PTB tokenizer (`{' '.join(command)}`) failed with exit status {process.returncode} and returned "
            f"{len(lines)} lines for {len(captions)} captions: {' '.join(messages)[-500:] or 'no error output'}"
        )
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(token for token in line.rstrip().split(" ") if token not in punctuation) for line in lines]


def _approximate_ptb_tokenize(captions: Sequence[str]) -> list[str]:
    tokenized = []
    for caption in captions:
        tokens = (_APPROX_BRACKETS.get(token, token) for token in _APPROX_TOKEN.findall(caption.lower()))
        tokenized.append(" ".join(token for token in tokens if token not in _APPROX_PUNCTUATION))
    return tokenized


def caption_tokenization(tokenize: bool = True) -> Literal["ptb", "python-approximation", "whitespace"]:
    """How [`tokenize_captions`] (and so `compute_caption_metrics`) tokenizes here: `"ptb"` (the COCO tokenizer,
    run with Java), `"python-approximation"` (`tokenize=True` without Java) or `"whitespace"` (`tokenize=False`)."""
    if not tokenize:
        return "whitespace"
    return "ptb" if _java_available() else "python-approximation"


def tokenize_captions(captions: Sequence[str], tokenize: bool = True) -> list[str]:
    """Tokenize captions as `compute_caption_metrics` does before scoring them; see [`caption_tokenization`].

    Without Java, `tokenize=True` warns and uses a Python approximation of the PTB tokenizer.
    """
    method = caption_tokenization(tokenize)
    if method == "whitespace":
        # Re-joining with single spaces also keeps line breaks out of METEOR's line protocol.
        return [" ".join(caption.split()) for caption in captions]
    if method == "ptb":
        return ptb_tokenize(captions)
    warnings.warn(
        "Java was not found on PATH, so captions are tokenized with a Python approximation of the PTB tokenizer "
        "that the COCO evaluation runs: BLEU, ROUGE_L and CIDEr are close to, but not exactly, the official COCO "
        f"scores. {_INSTALL_JAVA}",
        stacklevel=3,
    )
    return _approximate_ptb_tokenize(captions)


def _spice_problem() -> str | None:
    """Return why SPICE cannot run here, or `None` if it can."""
    from pycocoevalcap.spice import get_stanford_models, spice

    if not _java_available():
        return f"SPICE is skipped: it runs spice-1.0.jar and needs Java, which was not found on PATH. {_INSTALL_JAVA}"
    spice_dir = Path(spice.__file__).parent
    library = spice_dir / get_stanford_models.SPICELIB
    jars = [f"{get_stanford_models.JAR}.jar", f"{get_stanford_models.JAR}-models.jar"]
    missing = [jar for jar in jars if not (library / jar).is_file()]
    if missing:
        # Checked here because pycocoevalcap's Spice() would otherwise start a download.
        return (
            f"SPICE is skipped: it needs the Stanford CoreNLP 3.6.0 jars {', '.join(missing)} in {library}. "
            "Fetch them once, with network access, by running `python -m pycocoevalcap.spice.get_stanford_models`."
        )
    if not os.access(spice_dir, os.W_OK):
        return (
            f"SPICE is skipped: pycocoevalcap's SPICE wrapper writes temporary files and a parse cache into "
            f"{spice_dir}, which is not writable."
        )
    return None


def _score(
    metric: str, references: dict[ImageId, list[str]], predictions: dict[ImageId, list[str]]
) -> tuple[list[float], list[list[float]]] | None:
    """Run one pycocoevalcap scorer; return corpus scores and per-image scores (one list per key), or `None`."""
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        corpus, per_image = Bleu(4).compute_score(references, predictions, verbose=0)
        return corpus, per_image
    if metric == "meteor":
        if not _java_available():
            warnings.warn(
                "METEOR is skipped: the COCO METEOR runs meteor-1.5.jar and needs Java, which was not found on PATH. "
                f"{_INSTALL_JAVA}",
                stacklevel=3,
            )
            return None
        from pycocoevalcap.meteor.meteor import Meteor

        corpus, per_image = Meteor().compute_score(references, predictions)
        return [corpus], [per_image]
    if metric == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        corpus, per_image = Rouge().compute_score(references, predictions)
        return [corpus], [list(per_image)]
    if metric == "cider":
        from pycocoevalcap.cider.cider import Cider

        corpus, per_image = Cider().compute_score(references, predictions)
        return [corpus], [list(per_image)]
    return _score_spice(references, predictions)


def _score_spice(
    references: dict[ImageId, list[str]], predictions: dict[ImageId, list[str]]
) -> tuple[list[float], list[list[float]]] | None:
    """`_score` for SPICE, which warns and returns `None` when SPICE cannot run or fails."""
    problem = _spice_problem()
    if problem is None:
        from pycocoevalcap.spice.spice import Spice

        try:
            corpus, details = Spice().compute_score(references, predictions)
        except subprocess.CalledProcessError as error:
            problem = (
                f"SPICE is skipped: spice-1.0.jar failed with exit status {error.returncode}. SPICE 1.0 is known "
                "to fail on Java 16 and newer; run it with Java 8 or 11."
            )
        else:
            # Spice scores the images in sorted id order, the other scorers in input order.
            f_scores = dict(zip(sorted(references), (detail["All"]["f"] for detail in details), strict=True))
            return [corpus], [[f_scores[image_id] for image_id in references]]
    warnings.warn(problem, stacklevel=4)
    return None


def _check_inputs(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]] | None,
    empty_scored_as: str,
) -> None:
    """
    The checks every metric's inputs get (`references=None`: CLIPScore alone, which has none to check).
    `empty_scored_as` ends the warning about empty predictions: how the caller's metrics score them.
    """
    for name, value in (("predictions", predictions), ("references", references)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"`{name}` must be a mapping from image id to caption{'' if name == 'predictions' else 's'}, got a "
                f"{type(value).__name__}; for lists of captions in order, use CocoCaptionMetric().compute."
            )
    if not predictions:
        raise ValueError("There are no predictions to score.")
    unreferenced = [  # (`len`: a numpy array of captions has no truth value)
        image_id for image_id in predictions
        if references is not None and (references.get(image_id) is None or len(references[image_id]) == 0)
    ]
    if unreferenced:
        raise ValueError(
            f"{len(unreferenced)} of {len(predictions)} predicted images have no reference captions "
            f"(image ids: {_format_ids(unreferenced)}). Predict only images that the references cover."
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"The prediction for image id {image_id!r} must be a string, got {type(caption).__name__}."
            )
        _check_unicode(caption, f"The prediction for image id {image_id!r}")
        if references is None:
            continue
        refs = references[image_id]
        if isinstance(refs, str) or not all(isinstance(ref, str) for ref in refs):
            raise TypeError(f"The references for image id {image_id!r} must be a list of strings, got {refs!r:.200}.")
        for ref in refs:
            _check_unicode(ref, f"A reference caption of image id {image_id!r}")
    empty = [image_id for image_id, caption in predictions.items() if not caption.strip()]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(predictions)} predictions are empty (image ids: {_format_ids(empty)}); "
            f"{empty_scored_as}. A model that emits end-of-text first gives empty captions.",
            stacklevel=3,
        )


def check_metric_names(metrics: str | Iterable[str]) -> list[str]:
    """The requested metric names in `METRIC_NAMES` order; an unknown name is a ValueError listing the choices."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"Unknown caption metric(s) {unknown}; choose from {list(METRIC_NAMES)}.")
    return [name for name in METRIC_NAMES if name in names]


@overload
def compute_caption_metrics(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    metrics: str | Iterable[str] = ...,
    tokenize: bool = ...,
    return_per_image: Literal[False] = ...,
) -> dict[str, float]: ...


@overload
def compute_caption_metrics(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    metrics: str | Iterable[str] = ...,
    tokenize: bool = ...,
    *,
    return_per_image: Literal[True],
) -> tuple[dict[str, float], dict[ImageId, dict[str, float]]]: ...


def compute_caption_metrics(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    metrics: str | Iterable[str] = METRIC_NAMES,
    tokenize: bool = True,
    return_per_image: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[ImageId, dict[str, float]]]:
    """Score generated captions against references with the COCO caption evaluation code.

    The images scored are those in `predictions`; references of other images are ignored (they do not enter
    CIDEr's document frequencies either), as when COCOEvalCap is limited to the result file's images.

    Args:
        predictions: One generated caption per image id.
        references: The reference captions of each image id; every predicted image needs at least one.
        metrics: Any of `"bleu"`, `"meteor"`, `"rouge"`, `"cider"` and `"spice"`. METEOR and SPICE need Java
            (and SPICE the Stanford CoreNLP 3.6.0 jars); when they cannot run they are skipped with a warning.
        tokenize: `True` PTB-tokenizes all captions as COCO does (needs Java; without it a Python approximation is
            used, with a warning). `False` uses the captions as given, split on whitespace, as nlg-eval does for
            pre-tokenized text. METEOR additionally lower-cases and normalizes punctuation itself (`-norm`).
        return_per_image: Also return the scores of each image (the COCOEvalCap `imgToEval` values).

    Returns:
        The corpus scores, keyed as COCO names them (`Bleu_1` ... `Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`,
        `SPICE`), for the metrics that ran. With `return_per_image=True`, a tuple of these and a dict mapping each
        image id to its own scores under the same keys. BLEU and METEOR are corpus-level (BLEU from the n-gram
        counts of all captions, METEOR as its jar aggregates the whole corpus), so not the means of their per-image
        scores; ROUGE_L, CIDEr and SPICE are means over images.

    Raises:
        ImportError: If pycocoevalcap is not installed.
        ValueError: For unknown metric names, no predictions, predicted images without references, or captions
            holding lone surrogates (the message names the image ids). An empty prediction is scored, as
            COCOEvalCap scores it, with a warning naming the image ids.
        TypeError: If a caption is not a string or an image's references are not a list of strings.
    """
    names = check_metric_names(metrics)
    _check_inputs(predictions, references, "they are scored as COCOEvalCap scores them, near zero")
    require_pycocoevalcap()

    image_ids = list(predictions)
    # One tokenizer call for predictions and references: each Java start costs about half a second.
    captions = [predictions[image_id] for image_id in image_ids]
    captions += [ref for image_id in image_ids for ref in references[image_id]]
    tokenized = iter(tokenize_captions(captions, tokenize))
    tokenized_predictions = {image_id: [next(tokenized)] for image_id in image_ids}
    tokenized_references = {image_id: [next(tokenized) for _ in references[image_id]] for image_id in image_ids}

    scores: dict[str, float] = {}
    per_image: dict[ImageId, dict[str, float]] = {image_id: {} for image_id in image_ids}
    for name in names:
        result = _score(name, tokenized_references, tokenized_predictions)
        if result is None:
            continue
        for key, corpus, image_scores in zip(SCORE_KEYS[name], *result, strict=True):
            scores[key] = float(corpus)
            for image_id, score in zip(image_ids, image_scores, strict=True):
                per_image[image_id][key] = float(score)
    return (scores, per_image) if return_per_image else scores


CLIP_METRIC_NAMES: tuple[str, ...] = ("clipscore", "refclipscore")
"""Reference-free CLIPScore and RefCLIPScore (Hessel et al., 2021), which need the images and a CLIP model."""

CLIP_SCORE_KEYS: dict[str, str] = {"clipscore": "CLIPScore", "refclipscore": "RefCLIPScore"}


def compute_clip_metrics(
    predictions: Mapping[ImageId, str],
    image_paths: Mapping[ImageId, str | os.PathLike],
    clip_model: Any,
    references: Mapping[ImageId, Sequence[str]] | None = None,
    metrics: str | Iterable[str] = CLIP_METRIC_NAMES,
    batch_size: int = 32,
) -> tuple[dict[str, float], dict[ImageId, dict[str, float]]]:
    """CLIPScore and RefCLIPScore of each predicted caption against its image file (and its references).

    Args:
        predictions: One generated caption per image id.
        image_paths: Each predicted image id's image file.
        clip_model: A [`~clipcap_hf.inference.CLIPScorer`], or the folder or Hub name of a transformers `CLIPModel`
            (both towers are needed). Published CLIPScores use ViT-B/32 (`openai/clip-vit-base-patch32`).
        references: The reference captions of each image id (needed for `"refclipscore"`).
        metrics: `"clipscore"` and/or `"refclipscore"`.
        batch_size: Images scored at once.

    Returns:
        The corpus scores (the mean over images) under `CLIPScore` and `RefCLIPScore`, and each image's own.
    """
    from ..inference.captioner import decode_image
    from ..inference.clip_score import CLIPScorer

    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [name for name in names if name not in CLIP_METRIC_NAMES]
    if unknown:
        raise ValueError(f"Unknown CLIP metric(s) {unknown}; choose from {list(CLIP_METRIC_NAMES)}.")
    with_references = "refclipscore" in names
    if with_references and references is None:
        raise ValueError("RefCLIPScore needs the reference captions (`references`).")
    _check_inputs(predictions, references, "CLIP scores them as the empty text against their images, not as zero")
    without_image = [image_id for image_id in predictions if image_id not in image_paths]
    if without_image:
        raise ValueError(
            f"{len(without_image)} of {len(predictions)} predicted images have no image file (image ids: "
            f"{_format_ids(without_image)}). Give `image_paths` for every predicted image."
        )
    scorer = clip_model if isinstance(clip_model, CLIPScorer) else CLIPScorer(clip_model)
    image_ids = list(predictions)
    per_image: dict[ImageId, dict[str, float]] = {}
    for start in range(0, len(image_ids), batch_size):
        batch_ids = image_ids[start : start + batch_size]
        # Converted as the processor would, so that a file it refuses (a float TIFF of [0, 255] values) is named.
        images = [decode_image(image_paths[image_id]) for image_id in batch_ids]
        captions = [predictions[image_id] for image_id in batch_ids]
        if with_references:
            clip_scores, ref_scores = scorer.ref_clip_score(images, captions, [references[i] for i in batch_ids])
        else:
            clip_scores, ref_scores = scorer.clip_score(images, captions), None
        for row, image_id in enumerate(batch_ids):
            per_image[image_id] = {}
            if "clipscore" in names:
                per_image[image_id]["CLIPScore"] = float(clip_scores[row])
            if ref_scores is not None:
                per_image[image_id]["RefCLIPScore"] = float(ref_scores[row])
    keys = [CLIP_SCORE_KEYS[name] for name in CLIP_METRIC_NAMES if name in names]
    scores = {key: sum(scores[key] for scores in per_image.values()) / len(per_image) for key in keys}
    return scores, per_image


__all__ = [
    "CLIP_METRIC_NAMES",
    "CLIP_SCORE_KEYS",
    "METRIC_NAMES",
    "SCORE_KEYS",
    "caption_tokenization",
    "check_metric_names",
    "compute_caption_metrics",
    "compute_clip_metrics",
    "load_coco_predictions",
    "load_coco_references",
    "ptb_tokenize",
    "require_pycocoevalcap",
    "tokenize_captions",
]

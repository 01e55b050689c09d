"""`CocoCaptionMetric`: the COCO caption metrics of [`compute_caption_metrics`] as an `evaluate` metric.

Apart from `metrics.py`, so that scoring captions needs neither `evaluate` nor `datasets`.
"""

from __future__ import annotations

from collections.abc import Iterable

import datasets
import evaluate

from .metrics import METRIC_NAMES, compute_caption_metrics

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions (`list[str]`): One generated caption per image.
    references (`list[list[str]]` or `list[str]`): The reference captions of each image.
    metrics (`list[str]`, *optional*): Subset of "bleu", "meteor", "rouge", "cider", "spice" (default: all).
    tokenize (`bool`, *optional*, defaults to `True`): PTB-tokenize as COCO does (needs Java); `False` splits the
        captions on whitespace.

Returns:
    `dict[str, float]`: `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE` (those that ran).

Example:
    >>> from clipcap_hf.evaluation.coco_metric import CocoCaptionMetric
    >>> metric = CocoCaptionMetric()
    >>> metric.compute(predictions=["a dog runs on the grass"], references=[["a dog running on grass"]])
"""


class CocoCaptionMetric(evaluate.Metric):
    """The COCO caption metrics as an `evaluate` metric that needs no download: instantiate it directly.

    `compute(predictions=[...], references=[[...], ...])` returns the same dict as `compute_caption_metrics` for
    the same captions, the images being identified by their position. It also supports `add_batch` accumulation,
    e.g. over a `Trainer` evaluation loop. PTB tokenization and METEOR need Java, SPICE also the Stanford CoreNLP
    3.6.0 jars (see `clipcap_hf.evaluation.metrics`). CIDEr's document frequencies come from the scored references,
    so score a whole evaluation set at once rather than small batches.
    """

    def _info(self) -> evaluate.MetricInfo:
        string = datasets.Value("string")
        return evaluate.MetricInfo(
            description="BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE computed by the COCO caption evaluation code.",
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": string, "references": datasets.Sequence(string)}),
                datasets.Features({"predictions": string, "references": string}),
            ],
            codebase_urls=["https://github.com/tylin/coco-caption", "https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of predictions and their references; an empty batch is refused with a clear message."""
        # `evaluate` reads the input format off the first prediction, and fails with a bare IndexError without one.
        if predictions is not None and len(predictions) == 0:
            raise ValueError("There are no predictions to score: `predictions` is an empty list.")
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]] | list[str],
        metrics: str | Iterable[str] = METRIC_NAMES,
        tokenize: bool = True,
    ) -> dict[str, float]:
        references = [[refs] if isinstance(refs, str) else refs for refs in references]
        return compute_caption_metrics(
            dict(enumerate(predictions)), dict(enumerate(references)), metrics=metrics, tokenize=tokenize
        )


__all__ = ["CocoCaptionMetric"]

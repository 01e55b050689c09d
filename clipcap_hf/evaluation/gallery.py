"""An HTML caption gallery: one self-contained page of images beside their captions, references and scores.

The page embeds every thumbnail as a data URI and its small sorting script inline, so it can be mailed, archived or
opened offline as a single file. Clicking a score's column header sorts by that score, worst first (again for best
first), which puts the captions most worth a look at the top.

Example:

```python
>>> from clipcap_hf.evaluation.gallery import write_gallery
>>> write_gallery(
...     [{"image": "dog.jpg", "caption": "A dog on a beach.", "references": ["A dog runs."], "scores": {"CIDEr": 0.8}}],
...     "gallery.html",
... )
```
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

import PIL.Image

from ..utils.file_utils import write_text_atomically

THUMBNAIL_SIZE = 192
# File names that are not valid UTF-8 reach Python as lone surrogates (PEP 383), which no UTF-8 encoder writes.
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class GalleryRecord:
    """One image of the gallery."""

    image: str | os.PathLike | PIL.Image.Image
    """The image file, or the image itself."""
    caption: str
    """The generated caption."""
    references: Sequence[str] | None = None
    """Reference captions, when known."""
    scores: Mapping[str, float] | None = None
    """This image's scores as the COCO scorers give them (e.g. `{"CIDEr": 0.93, "Bleu_4": 0.41}`), when known. The page
    shows them ×100, as captioning papers and `clipcap evaluate`'s metrics table do."""
    name: str | None = None
    """What to call the image; defaults to its file path."""
    columns: Mapping[str, str] | None = None
    """More text columns after the caption (column title -> text), e.g. a second model's caption and the prefix read
    as words, as `clipcap interpret --gallery` shows them."""

    def __post_init__(self):
        # Caught here, or a string of references would show one per character and a None caption would fail deep
        # inside the HTML rendering.
        if not isinstance(self.image, (str, os.PathLike, PIL.Image.Image)):
            raise ValueError(
                f"`image` must be an image file's path or a PIL image, got {type(self.image).__name__}: open other "
                "forms (arrays, bytes) as a PIL image first."
            )
        if not isinstance(self.caption, str):
            raise ValueError(f"`caption` must be a string, got {self.caption!r}.")
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"`name` must be a string, got {self.name!r}.")
        if self.references is not None and (
            isinstance(self.references, str) or not all(isinstance(reference, str) for reference in self.references)
        ):
            raise ValueError(f"`references` must be a list of strings, got {self.references!r}.")
        if any(not isinstance(title, str) or not isinstance(text, str) for title, text in (self.columns or {}).items()):
            raise ValueError(f"`columns` must map column titles to strings, got {self.columns!r}.")
        for score_name, value in (self.scores or {}).items():
            if not isinstance(score_name, str):
                raise ValueError(f"Score names must be strings, got {score_name!r} in {self.scores!r}.")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"Score {score_name!r} must be a number, got {value!r}.")

    def display_name(self, index: int) -> str:
        """The name shown for the image: `name`, else its file path, else its position in the gallery."""
        if self.name is not None:
            return self.name
        if isinstance(self.image, PIL.Image.Image):
            return getattr(self.image, "filename", "") or f"image {index + 1}"
        return str(self.image)


def _as_record(record: GalleryRecord | Mapping, index: int) -> GalleryRecord:
    try:
        return record if isinstance(record, GalleryRecord) else GalleryRecord(**record)
    except (TypeError, ValueError) as error:  # a missing or unknown field, or a bad value
        raise ValueError(f"Gallery record {index}: {error}") from error


def _thumbnail(image: str | os.PathLike | PIL.Image.Image, name: str, size: int) -> str:
    """The image shrunk to fit `size` pixels above its name, or its name and the error when it cannot be read."""
    from ..image_processing_clipcap import load_image, to_rgb_image

    try:
        picture = image if isinstance(image, PIL.Image.Image) else load_image(Path(image))
        # What the model sees (upright, transparency on white, 16-bit scaled), as a new image: the caller's is kept.
        picture = to_rgb_image(picture)
        picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
    except (ValueError, OSError) as error:
        return f'<div class="unreadable"><strong>{escape(name)}</strong><p>{escape(str(error))}</p></div>'
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" alt="{escape(name)}"><div class="name">{escape(name)}</div>'


def _score_cell(value: float | None) -> str:
    # Missing and non-finite scores sort after every real score, whichever the direction.
    if value is None or not math.isfinite(value):
        return '<td class="score" data-value="">&ndash;</td>'
    return f'<td class="score" data-value="{float(value)!r}">{100 * value:.2f}</td>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2328; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.5rem; text-align: left; vertical-align: top; }
th { position: sticky; top: 0; background: #f6f8fa; }
th button { font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer; padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.score { font-variant-numeric: tabular-nums; text-align: right; }
td.caption { max-width: 24rem; font-size: 1.05rem; }
td.column { max-width: 20rem; white-space: pre-wrap; font-size: 0.9rem; }
td.references ul { margin: 0; padding-left: 1.2rem; max-width: 28rem; }
td.image .name { max-width: 12rem; font-size: 0.8rem; color: #59636e; overflow-wrap: anywhere; }
.unreadable { max-width: 12rem; color: #a40e26; background: #ffebe9; padding: 0.5rem; overflow-wrap: anywhere; }
.unreadable p { margin: 0.3rem 0 0; font-size: 0.85rem; }
"""

# Sorts the rows by the clicked column's `data-value`; ascending first, so the lowest scores (worst captions) lead.
_SCRIPT = """
const table = document.getElementById("gallery");
function sortBy(header) {
  const ascending = header.getAttribute("aria-sort") !== "ascending";
  for (const other of table.querySelectorAll("th[aria-sort]")) other.setAttribute("aria-sort", "none");
  header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const value = (row) => {
    const text = row.cells[header.cellIndex].dataset.value;
    return text === "" ? null : Number(text);
  };
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return ascending ? x - y : y - x;
  });
  table.tBodies[0].append(...rows);
}
for (const button of table.querySelectorAll("th[aria-sort] button")) {
  button.addEventListener("click", () => sortBy(button.parentElement));
}
"""


def render_gallery(
    records: Iterable[GalleryRecord | Mapping],
    title: str = "ClipCap captions",
    thumbnail_size: int = THUMBNAIL_SIZE,
    caption_title: str = "Caption",
) -> str:
    """
    The gallery page as an HTML string; see [`write_gallery`].
    """
    if thumbnail_size < 1:
        raise ValueError(f"`thumbnail_size` must be at least 1 pixel, got {thumbnail_size}.")
    records = [_as_record(record, index) for index, record in enumerate(records)]
    # Score columns in the order the records first name them.
    score_names = list(dict.fromkeys(name for record in records for name in (record.scores or {})))
    has_references = any(record.references is not None for record in records)
    column_titles = list(dict.fromkeys(title for record in records for title in (record.columns or {})))

    headers = ['<th aria-sort="ascending"><button type="button">#</button></th>', "<th>Image</th>",
               f"<th>{escape(caption_title)}</th>"]
    headers += [f"<th>{escape(column_title)}</th>" for column_title in column_titles]
    if has_references:
        headers.append("<th>References</th>")
    headers += [f'<th aria-sort="none"><button type="button">{escape(name)}</button></th>' for name in score_names]

    rows = []
    for index, record in enumerate(records):
        name = record.display_name(index)
        cells = [
            f'<td class="index" data-value="{index + 1}">{index + 1}</td>',
            f'<td class="image">{_thumbnail(record.image, name, thumbnail_size)}</td>',
            f'<td class="caption">{escape(record.caption)}</td>',
        ]
        cells += [f'<td class="column">{escape((record.columns or {}).get(title, ""))}</td>' for title in column_titles]
        if has_references:
            items = "".join(f"<li>{escape(reference)}</li>" for reference in record.references or ())
            cells.append(f'<td class="references"><ul>{items}</ul></td>')
        cells += [_score_cell((record.scores or {}).get(score_name)) for score_name in score_names]
        rows.append(f"<tr>{''.join(cells)}</tr>")

    hint = ""
    if score_names:
        hint = (
            " Scores are &times;100, as in the metrics table and captioning papers. Click a score to sort by it, worst "
            "first; click again for best first."
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="summary">{len(records)} image{"" if len(records) == 1 else "s"}.{hint}</p>
<table id="gallery">
<thead><tr>{"".join(headers)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return _SURROGATES.sub("\ufffd", page)  # U+FFFD, the replacement character


def write_gallery(
    records: Iterable[GalleryRecord | Mapping],
    path: str | os.PathLike,
    title: str = "ClipCap captions",
    thumbnail_size: int = THUMBNAIL_SIZE,
    caption_title: str = "Caption",
) -> Path:
    """
    Write one self-contained HTML page showing each image beside its caption, references and scores.

    Args:
        records: [`GalleryRecord`]s, or mappings with the same keys: `image` (a file path or a PIL image), `caption`,
            and optionally `references` (a list of strings), `scores` (a dict of score name to value), `name` and
            `columns` (more text columns: a dict of column title to text).
            An image that cannot be read shows its name and the error in place of the thumbnail.
        path: the HTML file to write; an existing one is replaced only once the new page is complete.
        title: the page's title and heading.
        thumbnail_size: the longest side of the embedded thumbnails, in pixels.
        caption_title: the caption column's title.

    Returns:
        `Path`: where the page was written.
    """
    path = Path(path)
    # Rendered whole, then written atomically: a failure never leaves a half-written or emptied page.
    write_text_atomically(path, render_gallery(records, title, thumbnail_size, caption_title))
    return path


__all__ = ["GalleryRecord", "render_gallery", "write_gallery"]

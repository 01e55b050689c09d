"""Reading the text files users hand the package (caption lists, predictions, arguments, configs).

Each failure names the file: a caption file in another encoding or a JSON typo otherwise surfaces as a bare
`UnicodeDecodeError` or `JSONDecodeError` that does not say which of several input files is at fault.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, TextIO


@contextlib.contextmanager
def open_text(path: str | os.PathLike[str], newline: str | None = None) -> Iterator[TextIO]:
    """Open a UTF-8 text file, skipping a byte-order mark (Excel writes one); another encoding is an error naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as file:
            yield file
    except UnicodeDecodeError as error:  # raised while reading, inside the caller's `with`
        raise ValueError(f"{path} is not valid UTF-8 ({error.reason}); the file must be UTF-8 encoded.") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in a UTF-8 file; a decoding or syntax error names the file."""
    with open_text(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None

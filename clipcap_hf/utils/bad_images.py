"""What to do with an image that cannot be read: one policy for training, embedding and captioning.

Apart from `data/` (which needs the datasets library) so that captioning, which can run without it, shares it.
"""

from __future__ import annotations

from typing import Literal

BadImagePolicy = Literal["error", "skip"]


def check_bad_image_policy(on_bad_image: str) -> None:
    """`"error"` stops at the first unreadable image, naming it; `"skip"` leaves it out with a count."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image (`--on_bad_image`) must be 'error' or 'skip', got {on_bad_image!r}.")

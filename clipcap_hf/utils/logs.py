"""Log records of other libraries that tell users of nothing they can act on, dropped while the code that causes
them runs (a filter on their own logger: the logging set-up of the program is left as it is)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def dropped_log_messages(prefix: str, logger_name: str | None = None) -> Iterator[None]:
    """
    Drop the records that the logger `logger_name` (the root logger by default) creates with a message starting with
    `prefix`, while the context runs. A logger's filters see only its own records, not those of the loggers below it.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)

"""Log lines operators can use: our `serving` and `sessions` loggers as text or JSON (`serving.log_format`).

Both formats render the same record: structured fields passed with `extra=` become JSON keys, or `key=value`
pairs after the text message, so a turn's line says the same thing whichever format a deployment picks.
"""

from __future__ import annotations

import logging
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
LOGGERS = ("serving", "sessions")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`: the message, then the record's `extra` fields."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {key}={value}" for key, value in vars(record).items() if key not in _STANDARD)
        return super().formatMessage(record) + fields


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Our INFO lines on stderr in the chosen format; Ray configures only its own loggers. Idempotent."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in [h for h in logger.handlers if getattr(h, "sessionserve", False)]:
            logger.removeHandler(handler)
        handler = logging.StreamHandler()
        handler.sessionserve = True  # type: ignore[attr-defined]  # ours to replace on the next call
        handler.setFormatter(formatter(log_format))
        logger.addHandler(handler)

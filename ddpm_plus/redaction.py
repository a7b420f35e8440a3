"""Keeping secrets (Hub tokens, passwords) out of files, logs and error messages: one rule for what names a
secret, used for configs (model cards, trackers), command lines (the run lock) and log records."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(r"token|secret|password", re.IGNORECASE)
REDACTED = "***"


def without_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that name tokens, secrets or passwords (for cards, trackers, logs)."""
    return {k: v for k, v in config.items() if not SECRET_NAME.search(k)}


def argv_without_secrets(argv: list[str]) -> list[str]:
    """A command line with the value of every token/secret/password flag replaced by ``***``
    (``--hub_token X`` and ``--hub_token=X``), for files such as the run lock."""
    out, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
        elif flag.startswith("--") and SECRET_NAME.search(flag):
            out.append(f"{flag}={REDACTED}" if eq else arg)
            hide_next = not eq
            continue
        else:
            out.append(arg)
        hide_next = False
    return out


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every occurrence of each (non-empty) secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """A handler filter that rewrites log records so that the given secrets never reach the output."""

    def __init__(self, *secrets: str | None):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            record.msg, record.args = redact(message, *self.secrets), None
        return True

"""Text from a server or a ledger made safe to show (on a terminal, in a page) and to store."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["PrintableFormatter", "printable", "safe_json", "storable"]

# What a terminal or a page would act on instead of showing: C0 controls but the tab, DEL and
# the C1 controls (ESC and CSI start escape sequences that retitle a window, clear the
# screen or hide text), the line and paragraph separators, the bidi controls that reorder
# what follows them, and lone surrogates (no encoding can write them).
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_LINE = re.compile(f"[\n{_UNSAFE}]")
# The same with the newline kept (a traceback's lines, a multi-line prompt in a page).
_UNSAFE_TEXT = re.compile(f"[{_UNSAFE}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(found: re.Match[str]) -> str:
    """The character as a visible escape, the way Python's repr writes it."""
    char = found.group()
    point = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every control, bidi override and lone surrogate shown as an escape (\\x1b,
    \\u202e), so that printing it moves no cursor and reorders nothing; `newlines` keeps
    line breaks."""
    pattern = _UNSAFE_TEXT if newlines else _UNSAFE_LINE
    if pattern.search(text) is None:  # the common case costs one scan
        return text
    return pattern.sub(_escape, text)


def storable(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, so that it encodes as UTF-8."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def safe_json(text: str) -> str:
    """JSON text (as json.dumps writes it) with every character `printable` would escape
    written as a \\u escape: the same value when parsed, valid UTF-8, safe to `cat`."""
    # json.dumps escapes C0 controls itself: ASCII text can hold only DEL (the usual case,
    # told at once: a str knows whether it is ASCII).
    if (text.isascii() and "\x7f" not in text) or _UNSAFE_LINE.search(text) is None:
        return text
    # json.dumps writes such characters only inside strings, where \u escapes mean them.
    return _UNSAFE_LINE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


class PrintableFormatter(logging.Formatter):
    """A log formatter that shows server text in messages and tracebacks escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A message is one line: a newline in it could forge a log line of its own.
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), newlines=True)

"""Untrusted text made safe to show: file contents and file names in error messages.

The CLI prints and the web app streams messages that quote strings read from codes files and
file names users gave. Such a string may hold anything a Python ``str`` can: lone UTF-16
surrogates (which no UTF-8 stream can carry; Gradio's event stream fails on them; Linux file
names that are not UTF-8 reach Python as such surrogates), control characters that move a
terminal's cursor, or tens of kilobytes of text. The helpers here give printable, valid Unicode
of bounded length. Standard library only.
"""

from __future__ import annotations

import math
import os
import reprlib

MAX_QUOTED = 80  # characters of one quoted value, before the note of what was cut

_repr = reprlib.Repr()
_repr.maxlevel = 3  # nesting shown: deeper containers are [...] or {...}
_repr.maxstring = MAX_QUOTED
_repr.maxother = MAX_QUOTED
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_BIG_INT_BITS = 200  # ints wider than this are described, not written out


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped: a surrogate escape of an
    undecodable file-name byte as ``\\xNN`` (the byte), anything else (control characters,
    lone surrogates, invisible format characters) as Python writes it in a string literal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return c.encode("unicode_escape").decode("ascii")


def show_path(path: str | bytes | os.PathLike) -> str:
    """A file name as the user gave it, printable (see `printable`), never cut."""
    return printable(os.fsdecode(os.fspath(path)))


def quote(value: object, limit: int = MAX_QUOTED) -> str:
    """``repr(value)``, bounded and printable: strings quoted with their special characters
    escaped, long strings and containers cut (``...``) to about ``limit`` characters with their
    full length noted, deep containers elided, and integers too wide to print described."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _BIG_INT_BITS:
            digits = math.floor(value.bit_length() * math.log10(2)) + 1
            return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"
    try:
        text = _repr.repr(value)
    except (RecursionError, ValueError):  # too deep, or holding an int too long to print
        return f"a {type(value).__name__} too large to show"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, str) and len(value) > _repr.maxstring - 2:
        text += f" ({len(value)} characters)"
    elif isinstance(value, list | dict | tuple) and len(value) > _repr.maxlist:
        text += f" ({len(value)} items)"
    return printable(text)

"""User strings made safe to show: one line, no control or direction characters; file
paths as findings show them."""

import functools
import os
import re

__all__ = ["printable", "table_cell", "shown_path"]

# Control characters (C0, DEL, C1), line and paragraph separators, bidirectional
# controls, surrogates and the two non-characters XML cannot carry.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    r"""``text`` with each unprintable character written as its Python escape.

    The result is one line, valid in XML, and reads in the order it is stored.

    >>> printable("a\nb\x00c\u202ed")
    'a\\nb\\x00c\\u202ed'
    """
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def table_cell(text: str) -> str:
    """``text`` for a Markdown table cell: printable, and ``|`` escaped so it cannot start a cell."""
    return printable(text).replace("|", "\\|")


def shown_path(filename: str) -> str:
    """A source file as findings name it: relative to the working folder when inside it."""
    return _shown_path(filename, os.getcwd())


@functools.lru_cache(maxsize=1024)
def _shown_path(filename: str, cwd: str) -> str:  # a trace asks for each file hundreds of times
    try:
        rel = os.path.relpath(filename, cwd)
    except ValueError:
        rel = filename
    return filename if rel.startswith("..") else rel

"""Findings as text: compiler-style lines, JSON, SARIF 2.1.0, GitHub annotations.

Node paths, model names and file names come from user code, so each format
escapes them by its own rules: text shows control characters as escapes (one
finding, one line), JSON and SARIF are ``json.dumps`` (SARIF URIs are
percent-encoded), and GitHub annotations follow the workflow-command escapes.
"""

import json
import re
from urllib.parse import quote

from ..ir.errors import ConfigError
from .checks import CODES
from .diagnostics import Diagnostic

__all__ = ["FORMATS", "format_diagnostics", "printable"]

FORMATS = ("text", "json", "sarif", "github")

# Control characters (C0, DEL, C1), line and paragraph separators, bidirectional
# controls, surrogates and the two non-characters XML cannot carry.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff\ufffe\uffff]")
# GitHub workflow commands: ::kind prop=value,prop=value::message
_GITHUB_MESSAGE = str.maketrans({"%": "%25", "\r": "%0D", "\n": "%0A"})
_GITHUB_PROPERTY = str.maketrans({"%": "%25", "\r": "%0D", "\n": "%0A", ":": "%3A", ",": "%2C"})


def printable(text: str) -> str:
    r"""``text`` with each unprintable character written as its Python escape.

    The result is one line, valid in XML, and reads in the order it is stored.

    >>> printable("a\nb\x00c\u202ed")
    'a\\nb\\x00c\\u202ed'
    """
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def _location(source: str) -> tuple[str, int] | None:
    path, _, line = source.rpartition(":")
    if not path or not line.isdigit():
        return None
    return path, int(line)


def _sarif(diagnostics: list[Diagnostic]) -> dict:
    from .. import __version__
    used = sorted({d.code for d in diagnostics} | set(CODES))
    results = []
    for d in diagnostics:
        result = {
            "ruleId": d.code,
            "level": d.severity,
            "message": {"text": d.message},
            "locations": [{"logicalLocations": [{"fullyQualifiedName": f"{d.model}:{d.node}",
                                                 "kind": "member"}]}],
        }
        loc = _location(d.source)
        if loc:
            result["locations"][0]["physicalLocation"] = {
                "artifactLocation": {"uri": quote(loc[0].replace("\\", "/"))},
                "region": {"startLine": max(loc[1], 1)},
            }
        results.append(result)
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "qkvflow", "version": __version__,
                "rules": [{"id": c, "shortDescription": {"text": CODES[c]}} for c in used],
            }},
            "results": results,
        }],
    }


def _github(d: Diagnostic) -> str:
    kind = "error" if d.severity == "error" else "warning"
    loc = _location(d.source)
    props = {"file": loc[0], "line": str(loc[1])} if loc else {}
    props["title"] = d.code
    fields = ",".join(f"{name}={value.translate(_GITHUB_PROPERTY)}" for name, value in props.items())
    message = f"{d.message} [{d.model}: {d.node}]".translate(_GITHUB_MESSAGE)
    return f"::{kind} {fields}::{message}"


def format_diagnostics(diagnostics: list[Diagnostic], fmt: str = "text", checked: int = 1) -> str:
    """Render findings as compiler-style text, JSON, SARIF 2.1.0 or GitHub annotations."""
    if fmt == "text":
        lines = [printable(d.text()) for d in diagnostics]
        errors = sum(d.severity == "error" for d in diagnostics)
        warnings = len(diagnostics) - errors
        lines.append(f"{checked} model(s) checked: {errors} error(s), {warnings} warning(s)")
        return "\n".join(lines)
    if fmt == "json":
        return json.dumps([d.as_dict() for d in diagnostics], indent=1)
    if fmt == "sarif":
        return json.dumps(_sarif(diagnostics), indent=1)
    if fmt == "github":
        return "\n".join(_github(d) for d in diagnostics)
    raise ConfigError(f"unknown check format {fmt!r}; use one of: {', '.join(FORMATS)}")

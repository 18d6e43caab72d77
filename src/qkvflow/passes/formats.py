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
from ..ir.text import printable
from .checks import CODES
from .diagnostics import Diagnostic

__all__ = ["FORMATS", "format_diagnostics"]

FORMATS = ("text", "json", "sarif", "github")

# GitHub workflow commands: ::kind prop=value,prop=value::message
_GITHUB_MESSAGE = str.maketrans({"%": "%25", "\r": "%0D", "\n": "%0A"})
_GITHUB_PROPERTY = str.maketrans({"%": "%25", "\r": "%0D", "\n": "%0A", ":": "%3A", ",": "%2C"})


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

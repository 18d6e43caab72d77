"""Hostile names through every output format.

``tests/data/hostile_model.py``, copied to a file whose own name is hostile,
names its model, stream, scopes, a block, an input and a layer with text that
breaks careless writers: CR, LF, NUL, ESC, ``"``, ``<b>``, ``&amp;``, ``%25``,
``%``, ``,``, ``::``, backslashes, a forged GitHub command, Mermaid and DOT
syntax, a right-to-left override, U+2028; a scope and a layer have names
20,000 characters long. A TOML file gives the ``tiny`` preset such a name. Each
format must parse by its own rules, carry every name intact or visibly
escaped, and gain no statement, annotation or line.
"""

import html
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import jsonschema
import networkx as nx
import pytest

import qkvflow as qf
from qkvflow.cli import main

DATA = Path(__file__).parents[1] / "data"
FILE = 'ev"il,%25%::x\u202e\r\n<&>.py'
TOML_NAME = 'evil\nname \x00 " <&> %,:: \\ \u202e'
TOML_NAME_TEXT = r'evil\nname \u0000 \" <&> %,:: \\ \u202e'  # the same, as a TOML basic string
SVG = "{http://www.w3.org/2000/svg}"
GRAPHML = "{http://graphml.graphdrawing.org/xmlns}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' not installed")


def shown(text: str) -> str:
    """A name as diagrams and the text format show it: the unprintable characters the
    hostile names use, as Python escapes."""
    for char, escape in (("\x00", r"\x00"), ("\x1b", r"\x1b"), ("\r", r"\r"), ("\n", r"\n"),
                         ("\u202e", r"\u202e"), ("\u2028", r"\u2028")):
        text = text.replace(char, escape)
    return text


def xml_safe(text: str) -> str:
    """A name as GraphML carries it: backslashes doubled, then NUL, ESC and CR escaped."""
    for char, escape in (("\\", "\\\\"), ("\x00", r"\x00"), ("\x1b", r"\x1b"), ("\r", r"\r")):
        text = text.replace(char, escape)
    return text


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(MODEL spec, its file, the loaded Model)."""
    path = tmp_path_factory.mktemp("hostile") / FILE
    shutil.copy(DATA / "hostile_model.py", path)
    spec = f"{path}:model"
    return spec, path, qf.load_model(spec)


@pytest.fixture(scope="module")
def graph(hostile):
    return qf.trace(hostile[2])


@pytest.fixture(scope="module")
def findings(graph):
    found = qf.check(graph)
    assert len(found) >= 2 and all("\x00" in d.node and len(d.node) > 20000 for d in found)
    return found


@pytest.fixture(scope="module")
def toml_models(tmp_path_factory):
    """Two TOML files of the ``tiny`` preset: one named hostilely, one plainly."""
    folder = tmp_path_factory.mktemp("toml")
    (folder / "hostile.toml").write_text(f'preset = "tiny"\nname = "{TOML_NAME_TEXT}"\n', encoding="utf-8")
    (folder / "plain.toml").write_text('preset = "tiny"\nname = "plain"\n', encoding="utf-8")
    assert qf.load_model(str(folder / "hostile.toml")).name == TOML_NAME
    return folder / "hostile.toml", folder / "plain.toml"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


# --- findings: text, JSON, SARIF, GitHub ------------------------------------------------------

def github_command(line: str) -> tuple[str, dict, str]:
    """(command, properties, message) of one line as the Actions runner reads it
    (``ActionCommand.TryParseV2``: the first ``::`` after the start ends the properties)."""
    assert line.startswith("::"), line
    end = line.index("::", 2)
    command, _, props = line[2:end].partition(" ")
    properties = dict(p.split("=", 1) for p in props.split(","))
    return (command, {k: unescape(v, "%(25|0D|0A|3A|2C)") for k, v in properties.items()},
            unescape(line[end + 2:], "%(25|0D|0A)"))


def unescape(text: str, codes: str) -> str:
    chars = {"25": "%", "0D": "\r", "0A": "\n", "3A": ":", "2C": ","}
    return re.sub(codes, lambda m: chars[m.group(1)], text)


def test_github_annotations_are_one_line_each_and_read_back_exactly(capsys, hostile, findings):
    spec, path, model = hostile
    code, out = run(capsys, "check", spec, "--format", "github")
    assert code == 1
    assert out == qf.format_diagnostics(findings, "github") + "\n"
    assert "\r" not in out
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == len(findings)  # the forged "::error file=forged" made no line of its own
    for line, d in zip(lines, findings):
        command, properties, message = github_command(line)
        file, _, number = d.source.rpartition(":")
        assert command == d.severity
        assert properties == {"file": file, "line": number, "title": d.code}
        assert file == str(path)
        assert message == f"{d.message} [{d.model}: {d.node}]"
        assert model.name in message


def test_text_findings_stay_one_line_each_with_visible_escapes(capsys, hostile, findings):
    code, out = run(capsys, "check", hostile[0])
    assert code == 1
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == len(findings) + 1
    assert not re.search("[\x00\x1b\r\u202e\u2028]", out)
    for line, d in zip(lines, findings):
        assert line == shown(d.text())


def test_json_and_sarif_round_trip_every_name_exactly(capsys, hostile, findings):
    spec, path, _ = hostile
    code, out = run(capsys, "check", spec, "--format", "json")
    assert code == 1 and json.loads(out) == [d.as_dict() for d in findings]
    code, out = run(capsys, "check", spec, "--format", "sarif")
    sarif = json.loads(out)
    jsonschema.validate(sarif, json.loads((DATA / "sarif-schema-2.1.0.json").read_text()))
    results = sarif["runs"][0]["results"]
    assert len(results) == len(findings)
    for result, d in zip(results, findings):
        location = result["locations"][0]
        assert result["message"]["text"] == d.message
        assert location["logicalLocations"][0]["fullyQualifiedName"] == f"{d.model}:{d.node}"
        uri = location["physicalLocation"]["artifactLocation"]["uri"]
        assert re.fullmatch(r"[A-Za-z0-9._~/%-]+", uri)  # RFC 3986: unreserved, "/" and %XX only
        assert unquote(uri) == str(path)


def test_graph_json_round_trips_every_name_exactly(capsys, tmp_path, hostile, graph):
    for argv in (["trace", hostile[0], "--format", "json"], ["render", hostile[0]]):
        out = tmp_path / "g.json"
        assert run(capsys, *argv, "-o", out)[0] == 0
        data = json.loads(out.read_text(encoding="utf-8"))
        assert data["graph"]["model"] == graph.graph["model"]
        assert [n["id"] for n in data["nodes"]] == list(graph)
        assert [(e["source"], e["target"]) for e in data["edges"]] == list(graph.edges())


# --- diagrams: Mermaid --------------------------------------------------------------------------

MERMAID_ID = r"[A-Za-z][A-Za-z0-9_]*"
MERMAID_TEXT = r'(?:[^"<>#;&%`]|#\w+;)*'  # every # starts an entity code
MERMAID_LABEL = rf'"{MERMAID_TEXT}(?:<br/>{MERMAID_TEXT})*"'
MERMAID_STATEMENTS = {
    "header": r"flowchart TB",
    "comment": rf"  %% ({MERMAID_TEXT}): Q blue, K green, V orange, residual dashed, mask dotted",
    "subgraph": rf" {{2,4}}subgraph ({MERMAID_ID})\[({MERMAID_LABEL})\]",
    "end": r" {2,4}end",
    "node": rf" {{2,6}}({MERMAID_ID})\[({MERMAID_LABEL})\]",
    "style": rf" {{2,6}}style ({MERMAID_ID}) fill:#[0-9a-f]{{6}}(?:,[a-z-]+:#?[0-9a-z]+)*",
    "edge": rf"  ({MERMAID_ID}) -\.?->(?:\|({MERMAID_LABEL})\|)? ({MERMAID_ID})",
    "linkStyle": r"  linkStyle ([\d,]+) stroke:#[0-9a-f]{6},stroke-width:[\d.]+px(?:,stroke-dasharray:2 3)?",
}


def mermaid_statements(text: str) -> list[tuple[str, tuple]]:
    """(kind, groups) of every line; a line of no known kind fails."""
    found = []
    for line in text.rstrip("\n").split("\n"):
        kinds = [(k, m.groups()) for k, p in MERMAID_STATEMENTS.items() if (m := re.fullmatch(p, line))]
        assert len(kinds) == 1, f"not one Mermaid statement: {line!r}"
        found.append(kinds[0])
    return found


def mermaid_decoded(label: str) -> list[str]:
    """The lines of a quoted label, its entity codes decoded."""
    def entity(m):
        return chr(int(m.group(1))) if m.group(1).isdigit() else html.unescape(f"&{m.group(1)};")
    return [re.sub(r"#(\w+);", entity, part) for part in label.strip('"').split("<br/>")]


@pytest.mark.parametrize("level", ["block", "op"])
def test_mermaid_has_no_injected_statement_and_shows_each_name(capsys, tmp_path, hostile, graph, level):
    spec, _, model = hostile
    out = tmp_path / "x.mmd"
    assert run(capsys, "render", spec, "-o", out, "--level", level)[0] == 0
    text = out.read_text(encoding="utf-8")
    assert text == qf.render(graph, fmt="mmd", level=level)
    statements = mermaid_statements(text)
    kinds = [k for k, _ in statements]
    assert kinds[:2] == ["header", "comment"] and kinds.count("comment") == 1
    assert mermaid_decoded(statements[1][1][0]) == [shown(f"{model.name} ({level} level)")]
    nodes = {g[0]: mermaid_decoded(g[1]) for k, g in statements
             if k == "node" and not g[0].startswith("legend_")}
    drawn = len(re.findall(r"^\s*n\d+ \[", qf.render(graph, fmt="dot", level=level), re.M))
    assert len(nodes) == drawn and (level == "block" or drawn == graph.number_of_nodes())
    assert all(re.fullmatch(r"n_[A-Za-z0-9_]+", nid) for nid in nodes)  # generated, never raw names
    assert [shown(model.name), "input", "(batch, seq)"] in nodes.values()
    streams = [mermaid_decoded(g[1]) for k, g in statements
               if k == "subgraph" and g[0] != "Legend" and not g[0].startswith("layer_")]
    assert streams == [[shown(f"{model.name} stream")]]
    edges = [g for k, g in statements if k == "edge"]
    assert all(tail in nodes and head in nodes for tail, _, head in edges)
    styled = sorted(int(i) for k, g in statements if k == "linkStyle" for i in g[0].split(","))
    assert styled == list(range(len(edges)))  # every edge keeps its role's colour


def test_mermaid_op_level_shows_a_long_name_shortened(graph):
    text = qf.render(graph, fmt="mmd", level="op")
    nodes = [mermaid_decoded(label) for label in re.findall(r'^    n_\w+\[("[^"]*")\]$', text, re.M)]
    (long,) = [lines[0] for lines in nodes if lines[0].startswith("long")]
    assert len(long) <= 200 and "…" in long and long.endswith("é")


# --- diagrams: DOT, SVG, PNG ----------------------------------------------------------------------

def svg_nodes(root) -> dict:
    """SVG id of every drawn node (not the legend) -> the texts drawn in it."""
    return {g.get("id"): [t.text for t in g.iter(f"{SVG}text")] for g in root.iter(f"{SVG}g")
            if g.get("class") == "node" and g.get("id") != "legend"}


def draws(text: str, drawn: str) -> bool:
    """Whether ``drawn`` shows ``text``: whole, or its start and its end around an ellipsis."""
    if len(text) <= 200:
        return drawn == shown(text)
    head, dots, tail = drawn.partition("…")
    return bool(dots and head and tail) and shown(text).startswith(head) and shown(text).endswith(tail)


@needs_dot
@pytest.mark.parametrize("level", ["block", "op"])
def test_dot_source_is_read_by_dot_and_svg_is_xml_with_every_name(capsys, tmp_path, hostile, graph, level):
    spec, _, model = hostile
    for suffix in (".dot", ".svg", ".png"):
        assert run(capsys, "render", spec, "-o", tmp_path / f"x{suffix}", "--level", level)[0] == 0
    source = (tmp_path / "x.dot").read_text(encoding="utf-8")
    assert not re.search("[\x00-\x08\x0b-\x1f\u202e\u2028]", source)
    proc = subprocess.run(["dot", "-Tsvg", tmp_path / "x.dot"], capture_output=True)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    root = ET.parse(tmp_path / "x.svg").getroot()
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert shown(f"{model.name} ({level} level)") in texts
    assert shown(f"{model.name} stream") in texts
    nodes = svg_nodes(root)
    assert [shown(model.name), "input", "(batch, seq)"] in nodes.values()
    if level == "op":
        assert len(nodes) == graph.number_of_nodes()
        for node in graph:
            (drawn,) = [nid for nid in nodes if draws(node, nid)]
            assert draws(node.rsplit(".", 1)[-1], nodes[drawn][0])


# --- GraphML ------------------------------------------------------------------------------------

def test_graphml_is_xml_with_one_key_per_attribute_and_reads_back(capsys, tmp_path, hostile, graph):
    out = tmp_path / "g.graphml"
    assert run(capsys, "trace", hostile[0], "--format", "graphml", "-o", out)[0] == 0
    root = ET.parse(out).getroot()
    keys = [(k.get("for"), k.get("attr.name")) for k in root.iter(f"{GRAPHML}key")]
    assert len(keys) == len(set(keys)) and ("node", "layer") in keys
    assert "None" not in {d.text for d in root.iter(f"{GRAPHML}data")}
    back = nx.read_graphml(out, force_multigraph=True)
    assert back.graph["model"] == xml_safe(graph.graph["model"])
    assert len(back) == len(graph)
    for node, data in graph.nodes(data=True):  # tuples and dicts as strings, None left out
        assert back.nodes[xml_safe(node)] == {k: v if isinstance(v, (bool, int, float)) else xml_safe(str(v))
                                              for k, v in data.items() if v is not None}
    edges = sorted((xml_safe(u), xml_safe(v), d["role"], d["arg"]) for u, v, d in graph.edges(data=True))
    assert edges == sorted((u, v, d["role"], d["arg"]) for u, v, d in back.edges(data=True))


def test_graphml_of_a_preset_declares_layer_once_and_leaves_missing_values_out(capsys):
    code, out = run(capsys, "trace", "tiny", "--format", "graphml")
    assert code == 0
    root = ET.fromstring(out)
    layer = [k for k in root.iter(f"{GRAPHML}key") if k.get("attr.name") in ("layer", "key_axis")]
    assert sorted((k.get("attr.name"), k.get("attr.type")) for k in layer) == [
        ("key_axis", "long"), ("layer", "long")]
    back = nx.read_graphml(io.BytesIO(out.encode()))
    assert "layer" not in back.nodes["src_ids"] and back.nodes["encoder.layers.1.norm1"]["layer"] == 1


# --- a model name from TOML ---------------------------------------------------------------------

@pytest.mark.parametrize("suffix, title_lines", [(".mmd", [1]), (".dot", [0, 1])])
def test_a_toml_model_name_changes_only_the_title(capsys, tmp_path, toml_models, suffix, title_lines):
    outs = []
    for i, toml in enumerate(toml_models):
        path = tmp_path / f"{i}{suffix}"
        assert run(capsys, "render", toml, "-o", path)[0] == 0
        outs.append(path.read_text(encoding="utf-8"))
    hostile, plain = (text.split("\n") for text in outs)
    assert len(hostile) == len(plain)
    assert [i for i, (a, b) in enumerate(zip(hostile, plain)) if a != b] == title_lines
    if suffix == ".mmd":
        comment = mermaid_statements(outs[0])[1][1][0]
        assert mermaid_decoded(comment) == [shown(f"{TOML_NAME} (layer level)")]


@needs_dot
def test_a_toml_model_name_is_the_svg_title(capsys, tmp_path, toml_models):
    path = tmp_path / "x.svg"
    assert run(capsys, "render", toml_models[0], "-o", path)[0] == 0
    texts = [t.text for t in ET.parse(path).getroot().iter(f"{SVG}text")]
    assert shown(f"{TOML_NAME} (layer level)") in texts


def test_explain_and_the_trace_table_keep_one_line_per_row(tmp_path):
    """A name with a newline, `|` or a direction override cannot add a row or a cell."""
    toml = tmp_path / "evil.toml"
    toml.write_text('preset = "tiny"\nname = "a\\nb | c\\u202ed"\n', encoding="utf-8")
    g = qf.trace(qf.load_model(str(toml)))
    plain = qf.trace(qf.load_model("tiny"))
    for fmt in ("text", "md"):
        text, reference = qf.explain(g, fmt=fmt), qf.explain(plain, fmt=fmt)
        assert len(text.splitlines()) == len(reference.splitlines())
        assert "\u202e" not in text and "a\\nb" in text
    md = qf.explain(g, fmt="md").splitlines()
    assert md[0] == "### Attention provenance of model a\\nb | c\\u202ed"
    assert all(line.count("|") == reference_line.count("|") for line, reference_line in
               zip(md[2:], qf.explain(plain, fmt="md").splitlines()[2:]))

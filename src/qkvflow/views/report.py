"""One self-contained HTML report of a model: diagrams, provenance, findings, a run.

:func:`node_details` gathers what a click on a diagram node shows (its path, op,
named shape with sizes, source line and parameters; a block's attention and
ops); :func:`html_report` lays the parts out in one file with inline SVG, CSS
and a little JavaScript (zoom, pan, click for details, an en/zh switch): no
network. Every string from the model, its code or its file names is escaped:
``html.escape`` in markup, and JSON with ``<``, ``>`` and ``&`` written as
``\\u`` escapes inside the script element.
"""

import html
import json

import networkx as nx

from ..ir.dims import describe_shape
from ..ir.graph import arg_nodes
from ..ir.text import shown_path

__all__ = ["node_details", "html_report"]


def node_details(g: nx.MultiDiGraph, sizes: dict | None = None) -> dict:
    """path -> details, for every graph node and every block (the ids of the
    diagrams' nodes at op and block level)."""
    sizes = {**g.graph.get("dims", {}), **(sizes or {})}
    details = {}
    blocks: dict = {}
    for node, d in g.nodes(data=True):
        params = {name: describe_shape(tuple(shape), sizes) for name, shape in d.get("params", {}).items()}
        details[node] = {"path": node, "op": d.get("op"), "shape": describe_shape(tuple(d.get("shape", ())), sizes),
                         "source": d.get("source", "?"), "params": params,
                         "inputs": arg_nodes(g, node)}
        if d.get("block_path"):
            blocks.setdefault(d["block_path"], []).append(node)
    attention = g.graph.get("attention", {})
    for block, members in blocks.items():
        if block in details:
            continue
        record = attention.get(block, {})
        params = {f"{m.rsplit('.', 1)[-1]}.{name}": describe_shape(tuple(shape), sizes)
                  for m in members for name, shape in g.nodes[m].get("params", {}).items()}
        details[block] = {"path": block, "op": record.get("kind") or g.nodes[members[0]].get("block") or "block",
                          "shape": details[members[-1]]["shape"], "source": _shown(record.get("source")
                                                                                    or details[members[0]]["source"]),
                          "params": params,
                          "ops": [f"{m.rsplit('.', 1)[-1]} ({g.nodes[m]['op']})" for m in members]}
        if record:
            site = (record.get("sites") or [{}])[0]
            details[block]["q/k/v"] = {r: site.get("origins", {}).get(r, "?") for r in ("q", "k", "v")}
            details[block]["masks"] = site.get("masks", [])
    return details


def _shown(source: str) -> str:
    """``file:line`` with the file as findings show it (relative to the working folder inside it)."""
    path, _, line = source.rpartition(":")
    return f"{shown_path(path)}:{line}" if path else source


def _svg_body(svg: str) -> str:
    """An SVG document without its XML prolog and doctype, to inline in HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else ""


def _script_json(value) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(key, '')))}</td>" for key, _ in columns) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_PROVENANCE_COLUMNS = {
    "en": [("attention", "attention"), ("q", "Q from"), ("k", "K from"), ("v", "V from"), ("mask", "mask"),
           ("count", "blocks")],
    "zh": [("attention", "注意力"), ("q", "Q 来自"), ("k", "K 来自"), ("v", "V 来自"), ("mask", "掩码"),
           ("count", "块数")],
}


def html_report(*, title: str, diagrams: dict, details: dict, provenance: dict, findings: list,
                heatmaps: str | None = None, stats: list | None = None, run_note: str = "") -> str:
    """The report's HTML.

    ``diagrams``: level -> SVG text; ``details``: :func:`node_details`;
    ``provenance``: lang -> the rows of ``explain(..., fmt="json")``;
    ``findings``: diagnostics (``as_dict()`` of each); ``heatmaps``: SVG text of
    the attention heatmaps of a run; ``stats``: one dict per node of that run
    (path, shape, mean, std, min, max).
    """
    esc = html.escape
    tabs = "".join(f'<button class="tab" data-level="{esc(level)}">{esc(level)} level</button>'
                   for level in diagrams)
    panes = "".join(f'<div class="pane" data-level="{esc(level)}"><div class="zoom">{_svg_body(svg)}</div></div>'
                    for level, svg in diagrams.items())
    tables = "".join(f'<div class="lang" data-lang="{esc(lang)}">{_table(rows, _PROVENANCE_COLUMNS[lang])}</div>'
                     for lang, rows in provenance.items() if lang in _PROVENANCE_COLUMNS)
    if findings:
        items = "".join(f'<li class="{esc(f["severity"])}"><code>{esc(f["code"])}</code> {esc(f["message"])} '
                        f'<span class="where">{esc(f["source"])}</span></li>' for f in findings)
        found = f"<ul class=\"findings\">{items}</ul>"
    else:
        found = '<p class="clean">No findings: the shapes, the Q/K/V provenance and the information flow check.</p>'
    run = ""
    if heatmaps or stats:
        run = f"<section id=\"run\"><h2>A run</h2><p>{esc(run_note)}</p>"
        if heatmaps:
            run += f'<div id="heatmaps">{_svg_body(heatmaps)}</div>'
        if stats:
            run += '<div id="stats">' + _table(stats, [("path", "node"), ("shape", "shape"), ("mean", "mean"),
                                                       ("std", "std"), ("min", "min"), ("max", "max")]) + "</div>"
        run += "</section>"
    return _PAGE.format(
        title=esc(title), tabs=tabs, panes=panes, tables=tables, findings=found, run=run,
        details=_script_json(details), count=len(findings))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; }}
header {{ padding: 12px 20px; background: #f4f4f8; border-bottom: 1px solid #ddd; }}
h1 {{ font-size: 18px; margin: 0; }} h2 {{ font-size: 16px; margin: 18px 0 8px; }}
main {{ display: grid; grid-template-columns: minmax(0, 1fr) 320px; gap: 16px; padding: 0 20px 20px; }}
.pane {{ display: none; border: 1px solid #ccc; height: 70vh; overflow: hidden; cursor: grab; background: #fff; }}
.pane.shown {{ display: block; }} .zoom {{ transform-origin: 0 0; }}
.tab, .langs button {{ border: 1px solid #bbb; background: #fff; padding: 4px 10px; cursor: pointer; }}
.tab.on, .langs button.on {{ background: #dde6ff; }}
g.node {{ cursor: pointer; }} g.node.picked polygon, g.node.picked ellipse {{ stroke: #d00; stroke-width: 3; }}
#details {{ border: 1px solid #ccc; padding: 10px; position: sticky; top: 10px; align-self: start;
  overflow-wrap: anywhere; }}
#details dt {{ font-weight: 600; margin-top: 6px; }} #details dd {{ margin: 0; font-family: monospace; }}
table {{ border-collapse: collapse; margin: 6px 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f4f4f8; }} .lang {{ display: none; }} .lang.shown {{ display: block; }}
.findings li.error code {{ color: #b00; }} .findings li.warning code {{ color: #a60; }}
.where {{ color: #666; font-family: monospace; }} .clean {{ color: #070; }}
#heatmaps svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
<header><h1>{title}</h1></header>
<main>
<div>
<section id="diagram"><h2>Dataflow</h2><div class="tabs">{tabs}</div>{panes}
<p class="hint">Scroll to zoom, drag to pan, click a node for its details.</p></section>
<section id="provenance"><h2>Where Q, K and V come from</h2>
<div class="langs"><button data-lang="en">English</button><button data-lang="zh">中文</button></div>{tables}</section>
<section id="findings"><h2>Findings ({count})</h2>{findings}</section>
{run}
</div>
<aside id="details"><p>Click a node of the diagram.</p></aside>
</main>
<script type="application/json" id="node-details">{details}</script>
<script>
(function () {{
  const details = JSON.parse(document.getElementById("node-details").textContent);
  const box = document.getElementById("details");
  function show(path) {{
    const d = details[path];
    box.textContent = "";
    const list = document.createElement("dl");
    const add = (key, value) => {{
      const dt = document.createElement("dt"); dt.textContent = key;
      const dd = document.createElement("dd"); dd.textContent = value;
      list.append(dt, dd);
    }};
    if (!d) {{ add("node", path); box.append(list); return; }}
    add("path", d.path); add("op", d.op); add("shape", d.shape); add("source", d.source);
    for (const [k, v] of Object.entries(d.params || {{}})) add("param " + k, v);
    if (d["q/k/v"]) for (const [k, v] of Object.entries(d["q/k/v"])) add(k.toUpperCase() + " from", v);
    if (d.masks) add("masks", d.masks.join(", ") || "none");
    if (d.inputs && d.inputs.length) add("inputs", d.inputs.join(", "));
    if (d.ops) add("ops", d.ops.join(", "));
    box.append(list);
  }}
  document.querySelectorAll("g.node").forEach((node) => node.addEventListener("click", (event) => {{
    document.querySelectorAll("g.node.picked").forEach((n) => n.classList.remove("picked"));
    node.classList.add("picked");
    show(node.id);
    event.stopPropagation();
  }}));
  function pick(selector, attr, value) {{
    document.querySelectorAll(selector).forEach((el) => el.classList.toggle(
      el.tagName === "BUTTON" ? "on" : "shown", el.dataset[attr] === value));
  }}
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {{
    pick(".tab, .pane", "level", b.dataset.level);
    const pane = document.querySelector(".pane.shown");
    if (pane && pane.fit && !pane.fitted) {{ pane.fit(); pane.fitted = true; }}
  }}));
  document.querySelectorAll(".langs button").forEach((b) => b.addEventListener("click", () => {{
    pick(".langs button, .lang", "lang", b.dataset.lang); }}));
  pick(".langs button, .lang", "lang", "en");
  document.querySelectorAll(".pane").forEach((pane) => {{
    const inner = pane.querySelector(".zoom");
    let scale = 1, x = 0, y = 0, drag = null;
    const apply = () => {{ inner.style.transform = `translate(${{x}}px, ${{y}}px) scale(${{scale}})`; }};
    const svg = inner.querySelector("svg");
    const fit = () => {{  // the whole width of the diagram in view at first
      const w = svg ? svg.getBoundingClientRect().width / scale : 0;
      if (w > 0 && pane.clientWidth > 0) {{ scale = Math.min(1, pane.clientWidth / w); x = 0; y = 0; apply(); }}
    }};
    pane.fit = fit;
    pane.addEventListener("wheel", (e) => {{
      e.preventDefault();
      const r = pane.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
      const f = e.deltaY < 0 ? 1.15 : 1 / 1.15;
      x = px - (px - x) * f; y = py - (py - y) * f; scale *= f; apply();
    }}, {{ passive: false }});
    pane.addEventListener("mousedown", (e) => {{ drag = [e.clientX - x, e.clientY - y]; }});
    window.addEventListener("mouseup", () => {{ drag = null; }});
    window.addEventListener("mousemove", (e) => {{ if (drag) {{ x = e.clientX - drag[0]; y = e.clientY - drag[1]; apply(); }} }});
  }});
  const first = document.querySelector(".tab");
  if (first) first.click();
}})();
</script>
</body></html>
"""

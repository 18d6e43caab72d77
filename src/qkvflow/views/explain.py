"""The explain stage: where Q, K and V of every attention come from, in words.

:func:`provenance` derives the provenance table of the design (attention
kind, purpose, Q/K/V source, mask) from a traced graph: the sources come
from the traced origins (``describe_origin``), the mask from the traced
masks, never from the declarations, so a rewired model shows its rewiring.
:func:`explain` formats that table, plus the consequences the graph
supports, as aligned text, GitHub markdown or JSON, in English or Chinese.
"""

import json
import unicodedata

import networkx as nx

from ..ir.errors import ConfigError
from ..ir.graph import ATTENTION_KINDS, describe_origin

__all__ = ["LANGS", "FORMATS", "provenance", "consequences", "explain"]

LANGS = ("en", "zh")
FORMATS = ("text", "md", "json")
COLUMNS = ("attention", "purpose", "q", "k", "v", "mask", "count")
MASK_ORDER = ("causal", "tgt_padding", "src_padding")

TEXT = {
    "en": {
        "kinds": ATTENTION_KINDS,
        "purposes": {
            "encoder_self": "context inside the source",
            "decoder_self": "context inside what was generated so far",
            "cross": "the bridge: decoder reads the encoder's final output",
        },
        "headers": ("attention kind", "purpose", "Q from", "K from", "V from", "mask", "blocks"),
        "masks": {"causal": "causal", "tgt_padding": "target padding",
                  "src_padding": "source padding"},
        "streams": {"encoder": "encoder", "decoder": "decoder"},
        "none": "none", "unknown": "unknown",
        "current": "{stream} stream", "memory": "encoder final output",
        "stale": "{stream} stream, {where} (stale: {node})",
        "other": "{stream} stream, {where}: {node}", "node": "node {node}",
        "layer": "layer {layer}", "embeddings": "embeddings",
        "title": "Attention provenance of model {model}", "consequences": "Consequences:",
        "once": ("{n} of {m} cross-attention blocks read K and V from the same node, the "
                 "encoder final output {memory}: their K/V projections depend only on "
                 "{inputs} and can be computed once per source."),
        "none_once": ("None of the {m} cross-attention blocks reads both K and V from the "
                      "encoder final output {memory}: none can be computed once per source."),
        "causal": ("Decoder position t depends on target tokens <= t only: all {n} attention "
                   "blocks that read K/V from the decoder stream are causally masked."),
        "future": ("No causal mask on {blocks}: they read K/V from the decoder stream, so "
                   "decoder position t can see target tokens after t."),
    },
    "zh": {
        "kinds": {"encoder_self": "编码器自注意力", "decoder_self": "带掩码的解码器自注意力",
                  "cross": "交叉注意力"},
        "purposes": {"encoder_self": "理解输入序列内部的上下文",
                     "decoder_self": "理解已生成序列的上下文",
                     "cross": "连接 Encoder 和 Decoder"},
        "headers": ("注意力类型", "目的", "Query (Q) 来源", "Key (K) 来源", "Value (V) 来源",
                    "掩码", "数量"),
        "masks": {"causal": "因果掩码", "tgt_padding": "目标端填充", "src_padding": "源端填充"},
        "streams": {"encoder": "编码器", "decoder": "解码器"},
        "none": "无", "unknown": "未知",
        "current": "{stream}的输入", "memory": "编码器的最终输出",
        "stale": "{stream}{where}的旧状态（{node}）",
        "other": "{stream}{where}的状态（{node}）", "node": "节点 {node}",
        "layer": "第 {layer} 层", "embeddings": "嵌入层",
        "title": "模型 {model} 的注意力来源", "consequences": "推论：",
        "once": ("{m} 个交叉注意力块中有 {n} 个的 K 和 V 读取同一个节点——编码器的最终输出 "
                 "{memory}：它们的 K/V 投影只依赖 {inputs}，每个源序列只需计算一次。"),
        "none_once": ("{m} 个交叉注意力块都没有同时从编码器的最终输出 {memory} 读取 K 和 V："
                      "没有一个能每个源序列只计算一次。"),
        "causal": ("解码器位置 t 只依赖目标端位置 <= t 的词元：从解码器流读取 K/V 的 {n} "
                   "个注意力块都带因果掩码。"),
        "future": ("{blocks} 从解码器流读取 K/V 却没有因果掩码，解码器位置 t 能看到 t 之后的"
                   "目标词元。"),
    },
}


def _words(lang: str) -> dict:
    if lang not in TEXT:
        raise ConfigError(f"explain: unknown lang {lang!r}; accepted: {', '.join(LANGS)}")
    return TEXT[lang]


def _source(origin: dict, w: dict) -> str:
    """Words for one traced origin (see ``qkvflow.graph.describe_origin``)."""
    state, stream = origin["state"], w["streams"].get(origin["stream"], origin["stream"])
    if state == "memory":
        return w["memory"]
    if state == "unknown":
        return w["unknown"]
    if state == "current" and stream:
        return w["current"].format(stream=stream)
    if not stream:
        return w["node"].format(node=origin["node"])
    layer = origin["layer"]
    where = w["embeddings"] if layer is None else w["layer"].format(layer=layer)
    return w[state if state == "stale" else "other"].format(
        stream=stream, where=where, node=origin["node"])


def _mask(masks: list | None, w: dict) -> str:
    if masks is None:
        return w["unknown"]
    if not masks:
        return w["none"]
    ordered = sorted(masks, key=lambda m: (MASK_ORDER.index(m) if m in MASK_ORDER else 99, m))
    return " + ".join(w["masks"].get(m, m.replace("_", " ")) for m in ordered)


def _row(g: nx.MultiDiGraph, path: str, record: dict, w: dict) -> dict:
    kind, origins = record["kind"], record.get("origins", {})
    row = {"kind": kind, "attention": w["kinds"].get(kind, kind),
           "purpose": w["purposes"].get(kind, "")}
    for role in ("q", "k", "v"):
        row[role] = _source(describe_origin(g, path, origins.get(role)), w)
    row["mask"] = _mask(record.get("masks"), w)
    return row


def provenance(graph: nx.MultiDiGraph, lang: str = "en") -> list[dict]:
    """The provenance table of ``graph``: one row per distinct wiring.

    Rows group the attention blocks that share kind, purpose, Q/K/V source
    and mask, in the order of the kinds and then of first appearance.

    Parameters
    ----------
    graph : networkx.MultiDiGraph
        A graph from :func:`qkvflow.trace`.
    lang : {"en", "zh"}
        Language of the words in the rows.

    Returns
    -------
    list of dict
        Keys ``kind`` (``encoder_self`` | ``decoder_self`` | ``cross``),
        ``attention``, ``purpose``, ``q``, ``k``, ``v``, ``mask``, ``count``
        and ``blocks`` (the block paths).

    Examples
    --------
    >>> import qkvflow as qf
    >>> rows = provenance(qf.trace(qf.load_model("tiny")))
    >>> [(r["attention"], r["k"], r["mask"], r["count"]) for r in rows][2]
    ('cross-attention', 'encoder final output', 'source padding', 2)
    """
    w, groups = _words(lang), {}
    for path, record in graph.graph["attention"].items():
        row = _row(graph, path, record, w)
        key = tuple(row.values())
        groups.setdefault(key, {**row, "count": 0, "blocks": []})
        groups[key]["count"] += 1
        groups[key]["blocks"].append(path)
    order = list(ATTENTION_KINDS)
    return sorted(groups.values(), key=lambda r: order.index(r["kind"]) if r["kind"] in order else 99)


def consequences(graph: nx.MultiDiGraph, lang: str = "en") -> list[str]:
    """Facts that follow from the wiring: K/V computed once, causality."""
    w, att, memory = _words(lang), graph.graph["attention"], graph.graph.get("memory")
    lines = []
    cross = [r for r in att.values() if r["kind"] == "cross"]
    if cross and memory in graph:
        same = [r for r in cross if r.get("origins", {}).get("k") == memory
                and r.get("origins", {}).get("v") == memory]
        inputs = sorted(graph.nodes[n].get("attrs", {}).get("name", n)
                        for n in nx.ancestors(graph, memory) if graph.nodes[n]["op"] == "input")
        template = w["once" if same else "none_once"]
        lines.append(template.format(n=len(same), m=len(cross), memory=memory, inputs=", ".join(inputs)))
    reading = {p: r for p, r in att.items() if any(
        graph.nodes[n].get("stream") == "decoder" for role, n in r.get("origins", {}).items()
        if role in ("k", "v") and n in graph)}
    unmasked = [p for p, r in reading.items() if "causal" not in r.get("masks", [])]
    if unmasked:
        lines.append(w["future"].format(blocks=", ".join(unmasked)))
    elif reading:
        lines.append(w["causal"].format(n=len(reading)))
    return lines


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _text(title: str, cells: list, notes: list, w: dict) -> str:
    widths = [max(_width(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(_pad(c, n) for c, n in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * n for n in widths))
    tail = [w["consequences"]] + [f"- {n}" for n in notes] if notes else []
    return "\n".join([title, ""] + lines + ([""] + tail if tail else [])) + "\n"


def _md(title: str, cells: list, notes: list, w: dict) -> str:
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
    tail = [f"**{w['consequences']}**", ""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join([f"### {title}", ""] + lines + ([""] + tail if tail else [])) + "\n"


def explain(graph: nx.MultiDiGraph, lang: str = "en", fmt: str = "text") -> str:
    """The provenance table of ``graph`` and its consequences, formatted.

    Parameters
    ----------
    graph : networkx.MultiDiGraph
        A graph from :func:`qkvflow.trace`.
    lang : {"en", "zh"}
        Language of headers, rows and consequences.
    fmt : {"text", "md", "json"}
        Aligned plain text, a GitHub markdown table, or JSON with keys
        ``model``, ``lang``, ``rows`` (see :func:`provenance`) and
        ``consequences``.

    Returns
    -------
    str

    Raises
    ------
    qkvflow.errors.ConfigError
        If ``lang`` or ``fmt`` is not one of the accepted values.

    Examples
    --------
    >>> import qkvflow as qf
    >>> g = qf.trace(qf.load_model("tiny"))
    >>> print(explain(g).splitlines()[0])
    Attention provenance of model tiny
    >>> "| 交叉注意力 |" in explain(g, lang="zh", fmt="md")
    True
    """
    w = _words(lang)
    if fmt not in FORMATS:
        raise ConfigError(f"explain: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    rows, notes = provenance(graph, lang), consequences(graph, lang)
    model = graph.graph.get("model", "")
    if fmt == "json":
        return json.dumps({"model": model, "lang": lang, "rows": rows, "consequences": notes},
                          ensure_ascii=False, indent=2)
    render = _text if fmt == "text" else _md
    cells = [list(w["headers"])] + [[str(r[c]) for c in COLUMNS] for r in rows]
    return render(w["title"].format(model=model), cells, notes, w)

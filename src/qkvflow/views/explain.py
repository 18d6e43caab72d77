"""The explain stage: where Q, K and V of every attention come from, in words.

:func:`provenance` derives the provenance table of the design (attention
kind, purpose, Q/K/V source, mask) from a traced graph: the sources come
from the origins the provenance pass found (``describe_origin``), the mask
from the masks it found, never from the declarations, so a rewired model
shows its rewiring. A model with one stream and no cross-attention (a
decoder-only or encoder-only model) gets the words of its family: masked
or bidirectional self-attention.
:func:`explain` formats that table, plus the consequences the graph
supports, as aligned text, GitHub markdown or JSON, in English or Chinese.
"""

import json
import unicodedata

import networkx as nx

from ..ir.dims import dim_table
from ..ir.errors import ConfigError
from ..ir.graph import ATTENTION_KINDS, describe_origin
from ..ir.text import printable, table_cell
from ..passes.provenance import ensure

__all__ = ["LANGS", "FORMATS", "provenance", "consequences", "explain", "kind_names"]

LANGS = ("en", "zh")
FORMATS = ("text", "md", "json")
COLUMNS = ("attention", "purpose", "q", "k", "v", "mask", "count")
MASK_ORDER = ("causal", "tgt_padding", "src_padding")
# Words for a single-stream model (decoder-only or encoder-only).
SINGLE = {
    "en": {"kinds": {"encoder_self": "bidirectional self-attention", "decoder_self": "masked self-attention"},
           "purposes": {"encoder_self": "context from the whole sequence",
                        "decoder_self": "context inside what was generated so far"}},
    "zh": {"kinds": {"encoder_self": "双向自注意力", "decoder_self": "带掩码的自注意力"},
           "purposes": {"encoder_self": "理解整个序列的上下文", "decoder_self": "理解已生成序列的上下文"}},
}

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
        "padding": "{dim} padding", "tokens": {"tgt": "target tokens", "src": "source tokens"},
        "dim_tokens": "{dim} tokens", "of_stream": "The {stream} stream's", "name": "{name}",
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
        "causal": ("{Stream} position t depends on {tokens} <= t only: all {n} attention "
                   "blocks that read K/V from the {stream} stream are causally masked."),
        "future": ("No causal mask on {blocks}: they read K/V from the {stream} stream, so "
                   "{stream} position t can see {tokens} after t."),
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
        "padding": "{dim} 填充", "tokens": {"tgt": "目标端位置", "src": "源端位置"},
        "dim_tokens": " {dim} 位置", "of_stream": "{stream} 流的", "name": " {name} ",
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
        "causal": ("{Stream}位置 t 只依赖{tokens} <= t 的词元：从{stream}流读取 K/V 的 {n} "
                   "个注意力块都带因果掩码。"),
        "future": ("{blocks} 从{stream}流读取 K/V 却没有因果掩码，{stream}位置 t 能看到 t 之后的"
                   "{tokens}。"),
    },
}


def _words(lang: str, graph: nx.MultiDiGraph | None = None) -> dict:
    """The words of ``lang``; those of its family for a single-stream model."""
    if lang not in TEXT:
        raise ConfigError(f"explain: unknown lang {lang!r}; accepted: {', '.join(LANGS)}")
    w = TEXT[lang]
    if graph is not None and _single_stream(graph):
        w = {**w, "kinds": {**w["kinds"], **SINGLE[lang]["kinds"]},
             "purposes": {**w["purposes"], **SINGLE[lang]["purposes"]}}
    return w


def kind_names(graph: nx.MultiDiGraph, lang: str = "en") -> dict:
    """Attention kind -> its name for ``graph``'s family (the table's first column)."""
    return _words(lang, graph)["kinds"]


def _single_stream(graph: nx.MultiDiGraph) -> bool:
    records = graph.graph["attention"].values()
    return len(graph.graph.get("streams", [])) <= 1 and not any(r["kind"] == "cross" for r in records)


def _stream_word(w: dict, stream: str | None) -> str | None:
    """A stream's word: its translation, else its own name (set apart from zh characters)."""
    if stream is None or stream in w["streams"]:
        return w["streams"].get(stream)
    return w["name"].format(name=stream)


def _source(origin: dict, w: dict) -> str:
    """Words for one traced origin (see ``qkvflow.ir.graph.describe_origin``)."""
    return _origin_text(origin, w).strip()


def _origin_text(origin: dict, w: dict) -> str:
    state, stream = origin["state"], _stream_word(w, origin["stream"])
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


def _mask_words(mask: str, w: dict) -> str:
    if mask in w["masks"]:
        return w["masks"][mask]
    if mask.endswith("_padding"):
        return w["padding"].format(dim=mask[: -len("_padding")])
    return mask


def _mask(masks: list | None, w: dict) -> str:
    if masks is None:
        return w["unknown"]
    if not masks:
        return w["none"]
    ordered = sorted(masks, key=lambda m: (MASK_ORDER.index(m) if m in MASK_ORDER else 99, m))
    return " + ".join(_mask_words(m, w) for m in ordered)


def _rows(g: nx.MultiDiGraph, path: str, record: dict, w: dict) -> list[dict]:
    """One row per distinct wiring among the block's sites (one per softmax)."""
    kind = record["kind"]
    rows = []
    for site in record["sites"] or [{}]:
        origins = site.get("origins", {})
        row = {"kind": kind, "attention": w["kinds"].get(kind, kind), "purpose": w["purposes"].get(kind, "")}
        for role in ("q", "k", "v"):
            row[role] = _source(describe_origin(g, path, origins.get(role)), w)
        row["mask"] = _mask(site.get("masks"), w)
        if row not in rows:
            rows.append(row)
    return rows


def provenance(graph: nx.MultiDiGraph, lang: str = "en") -> list[dict]:
    """The provenance table of ``graph``: one row per distinct wiring.

    Rows group the attention blocks that share kind, purpose, Q/K/V source
    and mask, in the order of the kinds and then of first appearance. A
    block whose heads are wired differently (one softmax per head) counts
    in the row of each of its wirings.

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
    ensure(graph)
    w, groups = _words(lang, graph), {}
    for path, record in graph.graph["attention"].items():
        for row in _rows(graph, path, record, w):
            key = tuple(row.values())
            groups.setdefault(key, {**row, "count": 0, "blocks": []})
            groups[key]["count"] += 1
            groups[key]["blocks"].append(path)
    order = list(ATTENTION_KINDS)
    return sorted(groups.values(), key=lambda r: order.index(r["kind"]) if r["kind"] in order else 99)


def consequences(graph: nx.MultiDiGraph, lang: str = "en") -> list[str]:
    """Facts that follow from the wiring: K/V computed once, causality."""
    ensure(graph)
    w, att, memory = _words(lang, graph), graph.graph["attention"], graph.graph.get("memory")
    sites = {path: [s for s in r["sites"] if "origins" in s] for path, r in att.items()}
    lines = []
    cross = [p for p, r in att.items() if r["kind"] == "cross"]
    if cross and memory in graph:
        same = [p for p in cross if sites[p] and all(
            s["origins"].get("k") == memory and s["origins"].get("v") == memory for s in sites[p])]
        inputs = sorted(graph.nodes[n].get("attrs", {}).get("name", n)
                        for n in nx.ancestors(graph, memory) if graph.nodes[n]["op"] == "input")
        template = w["once" if same else "none_once"]
        lines.append(template.format(n=len(same), m=len(cross), memory=memory, inputs=", ".join(inputs)))
    lines.extend(_causality(graph, sites, w))
    return lines


def _causality(graph: nx.MultiDiGraph, sites: dict, w: dict) -> list[str]:
    """Per causal sequence: are all blocks reading K/V over it causally masked?"""
    dims, causal = dim_table(graph.graph), {s for s, rule in graph.graph.get("sequences", {}).items()
                                            if rule == "causal"}
    lines = []
    for seq in sorted(causal):
        reading, stream = [], None
        for path, found in sites.items():
            for site in found:
                kv = [site["origins"].get(r) for r in ("k", "v") if site["origins"].get(r) in graph]
                over = [n for n in kv if any(dims.seq_of(d) == seq for d in graph.nodes[n]["shape"])]
                if over:
                    reading.append((path, "causal" in site.get("masks", [])))
                    stream = stream or graph.nodes[over[0]].get("stream")
        if not reading:
            continue
        word = _stream_word(w, stream) or seq
        known = stream in w["streams"]
        words = {"stream": word, "Stream": word[:1].upper() + word[1:] if known else w["of_stream"].format(stream=stream),
                 "tokens": w["tokens"].get(seq, w["dim_tokens"].format(dim=seq))}
        unmasked = list(dict.fromkeys(p for p, masked in reading if not masked))
        if unmasked:
            lines.append(w["future"].format(blocks=", ".join(unmasked), **words))
        else:
            lines.append(w["causal"].format(n=len({p for p, _ in reading}), **words))
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
    lines = ["| " + " | ".join(table_cell(c) for c in row) + " |" for row in cells]
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
    # names come from the user's model: one line each, no control or direction characters
    cells = [list(w["headers"])] + [[printable(str(r[c])) for c in COLUMNS] for r in rows]
    return render(w["title"].format(model=printable(model)), cells, [printable(n) for n in notes], w)

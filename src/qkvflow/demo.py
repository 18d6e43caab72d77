"""The story the project grew from: a decoder writes one word at a time.

:func:`translate` runs the shipped toy English -> Chinese model
(:mod:`qkvflow.models.toy_translation`) with :func:`qkvflow.generate`.
:func:`story` tells, for each word it writes, where the queries, keys and
values of the three attentions come from (read off the graph, as ``explain``
does) and which source word the cross-attention weighted most (read off the
activations of a forward pass over what was written).
"""

import numpy as np

__all__ = ["MODEL", "translate", "story"]

MODEL = "toy-en-zh"

_WORDS = {
    "en": {
        "title": "{src}  ->  {tgt}",
        "how": "(trained weights shipped with qkvflow; greedy decoding{cache})",
        "cache": ", incremental with a KV cache",
        "word": "word {n}: {word}",
        "enc": "encoder self-attention: Q, K, V from the {q}, over the source words ({src})",
        "dec": "masked self-attention:  Q from the {q} at this position; K, V from the {k}: {seen}",
        "cross": "cross-attention:        Q from the {q}; K, V from the {k} -> most weight on {best} ({w:.2f})",
    },
    "zh": {
        "title": "{src}  ->  {tgt}",
        "how": "（qkvflow 自带的训练好的权重；贪心解码{cache}）",
        "cache": "，使用 KV 缓存逐步计算",
        "word": "第 {n} 个词：{word}",
        "enc": "编码器自注意力：Q、K、V 都来自{q}，覆盖源句的所有词（{src}）",
        "dec": "带掩码的自注意力：Q 来自{q}的当前位置；K、V 来自{k}：{seen}",
        "cross": "交叉注意力：Q 来自{q}；K、V 来自{k} -> 权重最大的是 {best}（{w:.2f}）",
    },
}


def _load():
    from . import load_model, trace
    model = load_model(MODEL)
    return trace(model), model.params


def translate(sentences: list[str], *, beams: int = 1, graph=None, params=None, dtype: str = "float64") -> list[str]:
    """Chinese translations of English ``sentences`` of the toy language, as one padded batch.

    >>> translate(["I love China", "you like tea"])
    ['我 爱 中国', '你 喜欢 茶']
    """
    from .models import toy_translation as toy
    from .run.generate import generate
    sentences = list(sentences)
    if not sentences:
        return []
    if graph is None:
        graph, params = _load()
    out = generate(graph, params, toy.encode_source(sentences), max_new_tokens=toy.CONFIG.max_positions - 1,
                   beams=beams, dtype=dtype)
    return [toy.decode(row[1:]) for row in out.ids]


def story(sentence: str = "I love China", lang: str = "en") -> str:
    """The translation of ``sentence`` and, word by word, the provenance of the three
    attentions and the source word cross-attention weighted most (averaged over heads and layers)."""
    import json

    from .models import toy_translation as toy
    from .run.execute import forward
    from .run.generate import generate
    from .views.explain import explain

    words = _WORDS[lang]
    g, params = _load()
    src = toy.encode_source([sentence])
    out = generate(g, params, src, max_new_tokens=toy.CONFIG.max_positions - 1)
    tgt = out.ids
    written = toy.decode(tgt[0, 1:]).split()
    rows = {r["kind"]: r for r in json.loads(explain(g, lang=lang, fmt="json"))["rows"]}
    acts = forward(g, params, src, tgt, capture=True)["activations"]
    cross = [site["sites"][0]["softmax"] for site in g.graph["attention"].values() if site["kind"] == "cross"]
    weights = np.mean([acts[s][0].mean(axis=0) for s in cross], axis=0)  # (tgt, src) over layers and heads
    source_words = sentence.split() + ["<eos>"]
    lines = [words["title"].format(src=sentence, tgt=" ".join(written)),
             words["how"].format(cache=words["cache"] if out.cached else ""), ""]
    enc, dec, crs = rows["encoder_self"], rows["decoder_self"], rows["cross"]
    lines.append(words["enc"].format(q=enc["q"], src=" ".join(source_words)))
    for t, word in enumerate(written):
        seen = " ".join(toy.VOCAB[int(i)] for i in tgt[0, :t + 1])
        best = int(np.argmax(weights[t]))
        lines += ["", words["word"].format(n=t + 1, word=word),
                  "  " + words["dec"].format(q=dec["q"], k=dec["k"], seen=seen),
                  "  " + words["cross"].format(q=crs["q"], k=crs["k"], best=source_words[best],
                                               w=float(weights[t, best]))]
    return "\n".join(lines)

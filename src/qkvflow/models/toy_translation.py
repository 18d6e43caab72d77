"""A toy English -> Chinese language and a small encoder–decoder trained on it.

The language is a grammar of parallel sentences: a subject, an optional
adverb (*also* 也, *often* 经常), an optional negation (*do not* / *does
not* 不), a verb (with English agreement: *he loves*) and an object the verb
suits, and optionally *today*, which Chinese puts after the subject::

    I love China                        ->  我 爱 中国
    she often does not drink tea today  ->  她 今天 经常 不 喝 茶

Every sentence is in :func:`sentence_pairs`; a fixed ~15% of them, chosen
by hashing the English sentence, are held out (:func:`heldout_pairs`) and
never trained on (:func:`train_pairs`). One shared vocabulary
(:data:`VOCAB`) holds the special tokens, then the English words, then the
Chinese ones.

The model (:data:`CONFIG`) is an ``torch.nn.Transformer``-shaped
encoder–decoder, 2+2 post-norm layers with final norms, d_model 64, shared
and tied embeddings; its weights ship with the package
(``data/toy-en-zh.safetensors``, made by ``training/train_toy_translation.py``).
The source is the English words then ``<eos>``; the target starts with
``<bos>`` and ends with ``<eos>``.

>>> model, params, vocab = load()
>>> model.name, len(params), vocab[:3]
('toy-en-zh', 89, ['<pad>', '<bos>', '<eos>'])

It translates with :func:`qkvflow.demo.translate`.
"""

import hashlib
from importlib import resources

import numpy as np

from .config import Config, preset

__all__ = ["VOCAB", "CONFIG", "WEIGHTS", "sentence_pairs", "train_pairs", "heldout_pairs", "is_heldout",
           "encode", "decode", "encode_source", "load"]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# (English, English after he/she, Chinese)
SUBJECTS = [("I", False, "我"), ("you", False, "你"), ("he", True, "他"), ("she", True, "她"),
            ("we", False, "我们"), ("they", False, "他们")]
VERBS = [("love", "loves", "爱"), ("like", "likes", "喜欢"), ("see", "sees", "看见"), ("want", "wants", "想要"),
         ("eat", "eats", "吃"), ("drink", "drinks", "喝"), ("read", "reads", "读"), ("hear", "hears", "听见")]
OBJECTS = [("China", "中国"), ("Beijing", "北京"), ("tea", "茶"), ("coffee", "咖啡"), ("water", "水"),
           ("rice", "米饭"), ("noodles", "面条"), ("apples", "苹果"), ("books", "书"), ("music", "音乐"),
           ("cats", "猫"), ("dogs", "狗")]
# The objects each verb takes (love, like and want take every object).
_ALL = [en for en, _ in OBJECTS]
OBJECTS_OF = {
    "love": _ALL, "like": _ALL, "want": _ALL,
    "see": [o for o in _ALL if o != "music"],
    "eat": ["rice", "noodles", "apples"],
    "drink": ["tea", "coffee", "water"],
    "read": ["books"],
    "hear": ["music", "cats", "dogs"],
}
ADVERBS = [("", ""), ("also", "也"), ("often", "经常")]
NEGATION = ("not", "不")  # after "do" / "does"
TODAY = ("today", "今天")

_ENGLISH = ([s for s, _, _ in SUBJECTS] + ["do", "does", NEGATION[0]] + [a for a, _ in ADVERBS if a]
            + [TODAY[0]] + [w for base, third, _ in VERBS for w in (base, third)] + [o for o, _ in OBJECTS])
_CHINESE = ([z for _, _, z in SUBJECTS] + [NEGATION[1]] + [z for a, z in ADVERBS if a] + [TODAY[1]]
            + [z for _, _, z in VERBS] + [z for _, z in OBJECTS])

#: The shared vocabulary: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, the English words, the Chinese words.
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, *_ENGLISH, *_CHINESE)
_IDS = {word: i for i, word in enumerate(VOCAB)}
assert len(_IDS) == len(VOCAB), "a word is in the vocabulary twice"

#: The model whose weights ship with the package: the preset ``toy-en-zh``.
CONFIG: Config = preset("toy-en-zh")
assert CONFIG.vocab == len(VOCAB), "the preset's vocabulary is this language's"

#: The shipped weights, a file of this package (``qkvflow.models``).
WEIGHTS = "data/toy-en-zh.safetensors"

HELDOUT_PERCENT = 15


def sentence_pairs() -> list[tuple[str, str]]:
    """Every (English, Chinese) pair of the language, in a fixed order.

    >>> pairs = sentence_pairs()
    >>> ("I love China", "我 爱 中国") in pairs, len(pairs)
    (True, 3420)
    >>> dict(pairs)["she often does not drink tea"]
    '她 经常 不 喝 茶'
    """
    pairs = []
    for subj, third, subj_zh in SUBJECTS:
        for base, verb3, verb_zh in VERBS:
            for obj in OBJECTS_OF[base]:
                obj_zh = dict(OBJECTS)[obj]
                for adv, adv_zh in ADVERBS:
                    for negated in (False, True):
                        for today in (False, True):
                            if adv == "often" and today:
                                continue  # "often ... today" is no sentence
                            en = [subj] + ([adv] if adv else [])
                            en += (["does" if third else "do", NEGATION[0], base] if negated
                                   else [verb3 if third else base])
                            en += [obj] + ([TODAY[0]] if today else [])
                            zh = ([subj_zh] + ([TODAY[1]] if today else []) + ([adv_zh] if adv else [])
                                  + ([NEGATION[1]] if negated else []) + [verb_zh, obj_zh])
                            pairs.append((" ".join(en), " ".join(zh)))
    return pairs


def is_heldout(english: str) -> bool:
    """Whether an English sentence is in the held-out split (a hash of the sentence, the same everywhere)."""
    digest = hashlib.sha256(f"toy-en-zh/{english}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def train_pairs() -> list[tuple[str, str]]:
    """The pairs the shipped model was trained on."""
    return [p for p in sentence_pairs() if not is_heldout(p[0])]


def heldout_pairs() -> list[tuple[str, str]]:
    """The pairs the shipped model never saw (about 15% of the language)."""
    return [p for p in sentence_pairs() if is_heldout(p[0])]


def encode(sentence: str) -> list[int]:
    """Token ids of a sentence's words (split on whitespace), no special tokens added.

    >>> encode("I love China")
    [3, 15, 31]
    >>> decode(encode("我 爱 中国"))
    '我 爱 中国'
    """
    ids = []
    for word in sentence.split():
        if word not in _IDS:
            raise ValueError(f"word {word!r} is not in the toy vocabulary ({len(VOCAB)} words)")
        ids.append(_IDS[word])
    return ids


def decode(ids) -> str:
    """The words of ``ids`` up to the first ``<eos>``, without ``<pad>`` and ``<bos>``."""
    words = []
    for i in ids:
        i = int(i)
        if i == CONFIG.eos_id:
            break
        if i in (CONFIG.pad_id, CONFIG.bos_id):
            continue
        words.append(VOCAB[i])
    return " ".join(words)


def encode_source(sentences: list[str]) -> np.ndarray:
    """(batch, src) ids: each sentence's words then ``<eos>``, right-padded with ``<pad>``."""
    rows = [encode(s) + [CONFIG.eos_id] for s in sentences]
    width = max(len(r) for r in rows)
    if width > CONFIG.max_positions:
        raise ValueError(f"a sentence of {width - 1} words is longer than the model's "
                         f"{CONFIG.max_positions - 1}")
    out = np.full((len(rows), width), CONFIG.pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def load():
    """``(model, params, vocab)``: the qkvflow Model of :data:`CONFIG`, the shipped
    weights (path -> float32 array, read from safetensors, never via pickle) and
    the vocabulary as a list."""
    from safetensors.numpy import load as load_safetensors

    from .loader import load_model

    data = resources.files(__package__).joinpath(WEIGHTS).read_bytes()
    params = dict(load_safetensors(data))
    return load_model(CONFIG), params, list(VOCAB)

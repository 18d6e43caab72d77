"""Hypothesis strategies for tests/test_properties.py: valid configs of every family,
token ids, and the invalid inputs (TOML texts, token strings, dtypes, params) the
robustness properties feed to the API and the CLI.

A valid config is built from its family's tiny preset with
:func:`qkvflow.models.config.from_dict`, so it passes the same validation a TOML
file does. Every model dim and every sequence length of one example is a
different size (batch is 2 and no other axis is), so two axes cannot be confused
by accident.
"""

import dataclasses
import json
import math

import numpy as np
from hypothesis import strategies as st

from qkvflow.models.config import CHOICES, PRESETS, Config, from_dict

__all__ = ["BATCH", "FAMILY_PRESET", "Case", "cases", "preset_case", "token_ids", "real_ids", "toml_text",
           "toml_value", "typed_value", "toml_mutations", "HUGE", "LAYER_KEYS"]

BATCH = 2
FAMILY_PRESET = {"encoder_decoder": ("tiny", "bart-tiny", "marian-tiny", "t5-tiny"),
                 "decoder_only": ("gpt2-tiny", "llama-tiny"),
                 "encoder_only": ("bert-tiny",)}


@dataclasses.dataclass(frozen=True)
class Case:
    """A drawn config and the sequence lengths of its run: {"src": .., "tgt": ..} or {"seq": ..}.
    Shown as the ``from_dict`` call that builds it (the keys that differ from its preset)."""

    cfg: Config
    lengths: tuple  # ((dim, size), ...), hashable
    spec: tuple = ()  # the from_dict values that differ from the preset's, for the repr

    def __repr__(self):
        return f"Case(from_dict({dict(self.spec)!r}), lengths={dict(self.lengths)!r})"

    def _repr_pretty_(self, printer, cycle):  # what hypothesis prints for a failing example
        printer.text(repr(self))

    @property
    def family(self) -> str:
        return self.cfg.family

    def length(self, dim: str) -> int:
        return dict(self.lengths)[dim]


@st.composite
def cases(draw, family: str) -> Case:
    """A valid config of ``family`` (from one of its tiny presets) with sequence lengths."""
    used = {BATCH}

    def distinct(values):
        """One of ``values`` that no other axis has yet."""
        value = draw(st.sampled_from([v for v in values if v not in used]))
        used.add(value)
        return value

    base = draw(st.sampled_from(FAMILY_PRESET[family]))
    heads = distinct([3, 4, 5, 6])
    kv_heads = draw(st.sampled_from([0] + [k for k in range(1, heads) if heads % k == 0 and k != BATCH]))
    used.add(kv_heads or heads)
    positions = draw(st.sampled_from(CHOICES["positions"]))
    # rotary positions turn pairs of features: an odd d_head is QKV201 (a finding, not a valid config)
    head_dim = distinct([4, 6, 8, 10] if positions == "rotary" else range(3, 12))
    explicit = draw(st.booleans())  # d_head given (T5: heads * d_head != d_model) or d_model // heads
    d_model = distinct(range(8, 41)) if explicit else heads * head_dim
    used.add(d_model)
    values = {
        "preset": base, "name": "prop", "family": family,
        "d_model": d_model, "heads": heads, "d_head": head_dim if explicit else 0, "kv_heads": kv_heads,
        "d_ff": distinct(range(5, 49)),
        "vocab": distinct(range(13, 65)),
        "norm": draw(st.sampled_from(CHOICES["norm"])),
        "norm_type": draw(st.sampled_from(CHOICES["norm_type"])),
        "norm_eps": draw(st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3])),
        "activation": draw(st.sampled_from(CHOICES["activation"])),
        "ffn": draw(st.sampled_from(CHOICES["ffn"])),
        "bias": draw(st.booleans()),
        "attention_scale": draw(st.sampled_from(CHOICES["attention_scale"])),
        "tied_embeddings": draw(st.booleans()),
        "scale_embeddings": draw(st.booleans()),
        "embed_norm": draw(st.booleans()),
        "logits_bias": draw(st.booleans()),
        "final_norms": draw(st.booleans()),
        "positions": positions, "description": "",
    }
    values["rescale_output"] = values["tied_embeddings"] and draw(st.booleans())
    values["position_offset"] = draw(st.integers(0, 3)) if positions == "learned" else 0
    if positions == "rotary":
        values["rope_theta"] = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    if positions == "relative":
        buckets = distinct(range(4, 17))
        values["relative_buckets"] = buckets
        values["relative_max_distance"] = draw(st.integers(buckets, 64))
    if family == "encoder_decoder":
        values["encoder_layers"] = draw(st.integers(1, 3))
        values["decoder_layers"] = draw(st.integers(1, 3))
        separate = draw(st.booleans())
        values["src_vocab"] = distinct(range(13, 65)) if separate else 0
        values["shared_embeddings"] = False if separate else draw(st.booleans())
        seqs = ("src", "tgt")
    elif family == "decoder_only":
        values["encoder_layers"], values["decoder_layers"] = 0, draw(st.integers(1, 3))
        seqs = ("seq",)
    else:
        values["encoder_layers"], values["decoder_layers"] = draw(st.integers(1, 3)), 0
        values["head"] = draw(st.sampled_from(["mlm", "pooled"]))
        values["type_vocab"] = draw(st.sampled_from([0, 0] + [t for t in range(2, 8) if t not in used]))
        used.add(values["type_vocab"])
        seqs = ("seq",)
    # the special ids are tokens of every vocabulary (a source one too); -1: no padding token
    vocab = min(values["vocab"], values.get("src_vocab") or values["vocab"])
    specials = [0, 1, 2, vocab - 1]
    values["pad_id"] = draw(st.sampled_from(specials + ([-1] if family == "decoder_only" else [])))
    values["bos_id"] = draw(st.sampled_from(specials))
    values["eos_id"] = draw(st.sampled_from(specials))
    lengths = tuple((dim, distinct(range(3, 18))) for dim in seqs)
    # room for every run of the tests: a padded sequence grows by up to 3 pad tokens
    values["max_positions"] = distinct(range(max(n for _, n in lengths) + 3, 81))
    cfg = from_dict(values, origin="property")
    base = PRESETS[values["preset"]]
    spec = tuple((k, v) for k, v in values.items()
                 if k in ("preset", "family") or getattr(base, k) != v)
    return Case(cfg, lengths, spec)


def preset_case(name: str) -> Case:
    """A preset as a Case, with the sequence lengths of tests/models/test_families.py."""
    cfg = PRESETS[name]
    lengths = (("src", 11), ("tgt", 10)) if cfg.family == "encoder_decoder" else (("seq", 9),)
    return Case(cfg, lengths, (("preset", name),))


def token_ids(draw, shape: tuple, vocab: int) -> np.ndarray:
    """Token ids of ``shape``, any id of the vocabulary (special ones included)."""
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def real_ids(draw, shape: tuple, vocab: int, pad_id: int) -> np.ndarray:
    """Token ids that are never the pad id."""
    ids = token_ids(draw, shape, vocab - 1)
    return ids + (ids >= pad_id) if pad_id >= 0 else ids


# --- invalid inputs --------------------------------------------------------------------

# Sizes that cannot be allocated (> any RAM): a run must refuse them, not swap for an hour.
HUGE = [2**40, 2**53, 2**63 - 1, -(2**63), 10**30]
# A layer count is a loop of the tracer, not an allocation: huge ones only take forever.
LAYER_KEYS = ("encoder_layers", "decoder_layers")
FIELDS = [f.name for f in dataclasses.fields(Config)]
NAMES = sorted({v for c in CHOICES.values() for v in c} | set(PRESETS)
               | {"", "none", "Tiny", "tiny ", "rnn", "swish", "geglu", "abs", "post-norm"})


def toml_value() -> st.SearchStrategy:
    """Any TOML value: numbers of every kind, strings, booleans, arrays, tables, dates."""
    return st.one_of(
        st.integers(-3, 70),
        st.sampled_from([0, -1] + HUGE),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e308, 0.5, 2.5, -1e-6]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.sampled_from(NAMES),
        st.text(max_size=8),
        st.lists(st.integers(-2, 50), max_size=3),
        st.dictionaries(st.sampled_from(["a", "d_model", "preset"]), st.integers(0, 9), max_size=2),
        st.just(_Date("1979-05-27")),
    )


class _Date(str):
    """A TOML local date, written bare."""


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else json.dumps(key)


def _toml_literal(value) -> str:
    if isinstance(value, _Date):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_literal(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_text(values: dict) -> str:
    return "".join(f"{_toml_key(k)} = {_toml_literal(v)}\n" for k, v in values.items())


def typed_value(key: str) -> st.SearchStrategy:
    """A value of the type ``key`` takes, often out of its range: the mutations that get
    past loading, to the checker and the run."""
    default = getattr(Config(), key, None)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        small = st.integers(-3, 70)
        return small if key in LAYER_KEYS else st.one_of(small, st.sampled_from([0, -1] + HUGE))
    if isinstance(default, float):
        return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e308, -1.0, 1e-3]),
                         st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 70))
    return st.sampled_from(CHOICES.get(key, ()) or NAMES) if key in CHOICES else st.sampled_from(NAMES)


@st.composite
def toml_mutations(draw) -> tuple[str, str]:
    """(family, TOML text): a valid config's keys, then 1-3 of them changed: a value of the
    right type out of range (most often), a value of any type, a key removed, an unknown key,
    an unknown or other preset; at times a few characters of the text changed too."""
    family = draw(st.sampled_from(sorted(FAMILY_PRESET)))
    values = dict(_valid_keys(draw(cases(family))))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["typed", "typed", "typed", "any", "delete", "unknown key", "preset"]))
        if how == "typed":
            key = draw(st.sampled_from(FIELDS))
            values[key] = draw(typed_value(key))
        elif how == "any":
            key = draw(st.sampled_from(["family"] + FIELDS))
            value = draw(toml_value())
            values[key] = min(value, 64) if key in LAYER_KEYS and isinstance(value, int) else value
        elif how == "delete":
            values.pop(draw(st.sampled_from(sorted(values))), None)
        elif how == "unknown key":
            key = draw(st.one_of(st.sampled_from(["d_modle", "layers", "Heads", "", "a.b", "dims"]),
                                 st.text(min_size=1, max_size=6)))
            values[key] = draw(toml_value())
        else:
            values["preset"] = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=6)))
    text = toml_text(values)
    if draw(st.integers(0, 5)) == 0:  # now and then, a few characters of the text changed
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.text(max_size=2)) + text[at + draw(st.integers(0, 2)):]
    return family, text


def _valid_keys(case: Case) -> dict:
    """The keys of a drawn valid config that differ from its family's defaults, as a TOML
    file would give them (no preset: the family says what is missing)."""
    cfg = case.cfg
    bare = from_dict({"family": cfg.family})
    return {"family": cfg.family, **{k: v for k, v in cfg.as_dict().items()
                                     if v != getattr(bare, k) and k not in ("name", "description")}}

"""Configs of the encoder–decoder family: presets and TOML files.

Loading validates the *form* of a config (known keys, right types, one of
the accepted values) and raises :class:`~qkvflow.errors.ConfigError` naming
the key. Constraints between values (``d_model`` divisible by ``heads``,
positive sizes) are the checker's QKV1xx findings, so a model that breaks
them can still be traced and shown.
"""

import dataclasses
import tomllib
from pathlib import Path

from ..ir.errors import ConfigError
from ..ir.ops import OPS

__all__ = ["Config", "PRESETS", "preset", "load_toml", "from_dict", "CHOICES"]


FAMILIES = ("encoder_decoder", "decoder_only", "encoder_only")


@dataclasses.dataclass(frozen=True)
class Config:
    """One Transformer of a family, every option a field (see README, "Families")."""

    name: str = "custom"
    family: str = "encoder_decoder"
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_model: int = 512
    heads: int = 8
    d_head: int = 0  # 0: d_model // heads
    kv_heads: int = 0  # 0: heads (grouped-query attention when fewer)
    d_ff: int = 2048
    vocab: int = 32000
    src_vocab: int = 0  # 0: the source shares the target vocabulary
    type_vocab: int = 0  # token types (BERT's segments); 0: none
    max_positions: int = 512
    norm: str = "post"
    norm_type: str = "layer"
    activation: str = "relu"
    ffn: str = "plain"
    bias: bool = True
    positions: str = "sinusoidal"
    position_offset: int = 0  # BART's learned positions start at row 2
    rope_theta: float = 10000.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attention_scale: str = "sqrt"
    shared_embeddings: bool = True  # encoder and decoder read one token table (encoder_decoder)
    tied_embeddings: bool = True  # the output projection is the decoder's token table
    scale_embeddings: bool = True
    embed_norm: bool = False
    logits_bias: bool = False
    rescale_output: bool = False  # T5: d_model^-0.5 before a tied output projection
    final_norms: bool = False
    head: str = "lm"
    norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.d_head or (self.d_model // self.heads if self.heads > 0 else 0)

    def dims(self) -> dict:
        """The dims table: model dims with sizes, data dims free (None)."""
        seqs = ("src", "tgt") if self.family == "encoder_decoder" else ("seq",)
        dims = {"batch": None, **dict.fromkeys(seqs),
                "d_model": self.d_model, "heads": self.heads, "d_head": self.head_dim,
                "d_ff": self.d_ff, "vocab": self.vocab,
                "max_positions": self.max_positions + (self.position_offset if self.positions == "learned" else 0)}
        if self.kv_heads and self.kv_heads != self.heads:
            dims["kv_heads"] = self.kv_heads
        if self.src_vocab and self.family == "encoder_decoder":
            dims["src_vocab"] = self.src_vocab
        if self.type_vocab:
            dims["type_vocab"] = self.type_vocab
        if self.positions == "relative":
            dims["buckets"] = self.relative_buckets
        return dims

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The accepted values of each option: what the builders and the kernels (the op registry) implement.
CHOICES = {
    "family": FAMILIES,
    "norm": ("post", "pre"),
    "norm_type": OPS["norm"].choices["kind"],
    "activation": OPS["activation"].choices["fn"],
    "ffn": ("plain", "gated"),
    "positions": OPS["positional"].choices["kind"] + ("rotary", "relative"),
    "attention_scale": ("sqrt", "none"),
    "head": ("lm", "mlm", "pooled"),
}
# Options that only one family has, and the heads each family may have.
FAMILY_ONLY = {"src_vocab": "encoder_decoder", "type_vocab": "encoder_only"}
HEADS = {"encoder_decoder": ("lm",), "decoder_only": ("lm",), "encoder_only": ("mlm", "pooled")}
STACKS = {"encoder_decoder": ("encoder_layers", "decoder_layers"), "decoder_only": ("decoder_layers",),
          "encoder_only": ("encoder_layers",)}

PRESETS = {
    "vaswani-base": Config(
        name="vaswani-base", encoder_layers=6, decoder_layers=6, d_model=512, heads=8,
        d_ff=2048, vocab=37000, max_positions=512, norm="post", activation="relu",
        positions="sinusoidal", tied_embeddings=True, scale_embeddings=True,
        description="the original paper's base model: 6+6 layers, post-norm, shared embeddings",
    ),
    "torch-transformer": Config(
        name="torch-transformer", encoder_layers=6, decoder_layers=6, d_model=512, heads=8,
        d_ff=2048, vocab=32000, max_positions=1024, norm="post", activation="relu",
        positions="sinusoidal", shared_embeddings=False, tied_embeddings=False, scale_embeddings=True,
        final_norms=True,
        description="torch.nn.Transformer defaults (with its final norms) plus embeddings and output",
    ),
    "tiny": Config(
        name="tiny", encoder_layers=2, decoder_layers=2, d_model=21, heads=3, d_ff=29,
        vocab=41, max_positions=64, norm="post", activation="relu", positions="sinusoidal",
        tied_embeddings=True, scale_embeddings=True,
        description="2+2 layers, every dim a different size (heads 3, d_head 7, d_ff 29, vocab 41)",
    ),
    "toy-en-zh": Config(
        name="toy-en-zh", encoder_layers=2, decoder_layers=2, d_model=64, heads=4, d_ff=128, vocab=73,
        max_positions=32, norm="post", activation="relu", positions="sinusoidal", final_norms=True,
        pad_id=0, bos_id=1, eos_id=2,
        description="a toy English -> Chinese translator, trained weights shipped: I love China -> 我 爱 中国",
    ),
    # --- BART, Marian, T5: encoder–decoder ------------------------------------------
    "bart-tiny": Config(
        name="bart-tiny", encoder_layers=2, decoder_layers=2, d_model=24, heads=4, d_ff=37, vocab=53,
        max_positions=40, positions="learned", position_offset=2, embed_norm=True, scale_embeddings=False,
        activation="gelu", logits_bias=True, pad_id=1, bos_id=0, eos_id=2,
        description="BART at a small size: learned positions from row 2, embedding LayerNorm, logits bias",
    ),
    "bart-base": Config(
        name="bart-base", encoder_layers=6, decoder_layers=6, d_model=768, heads=12, d_ff=3072,
        vocab=50265, max_positions=1024, positions="learned", position_offset=2, embed_norm=True,
        scale_embeddings=False, activation="gelu", logits_bias=True, pad_id=1, bos_id=0, eos_id=2,
        description="facebook/bart-base's shapes (weights: qkvflow import)",
    ),
    "marian-tiny": Config(
        name="marian-tiny", encoder_layers=2, decoder_layers=2, d_model=20, heads=5, d_ff=33, vocab=47,
        max_positions=50, positions="sinusoidal_half", activation="silu", logits_bias=True, pad_id=46,
        bos_id=46, eos_id=0,
        description="Marian at a small size: half-split sinusoids, SiLU, logits bias, start token = pad",
    ),
    "opus-mt-en-zh": Config(
        name="opus-mt-en-zh", encoder_layers=6, decoder_layers=6, d_model=512, heads=8, d_ff=2048,
        vocab=65001, max_positions=512, positions="sinusoidal_half", activation="silu", logits_bias=True,
        pad_id=65000, bos_id=65000, eos_id=0,
        description="Helsinki-NLP/opus-mt-en-zh's shapes, English -> Chinese (weights: qkvflow import)",
    ),
    "t5-tiny": Config(
        name="t5-tiny", encoder_layers=2, decoder_layers=2, d_model=20, heads=3, d_head=7, d_ff=29,
        vocab=43, max_positions=64, norm="pre", norm_type="rms", norm_eps=1e-6, positions="relative",
        relative_buckets=8, relative_max_distance=20, attention_scale="none", bias=False, ffn="gated",
        activation="gelu_tanh", tied_embeddings=False, scale_embeddings=False, pad_id=0, bos_id=0, eos_id=1,
        description="T5 v1.1 at a small size: RMSNorm, relative position buckets, unscaled attention, "
                    "gated GELU, untied head, inner width heads*d_head 21 != d_model 20",
    ),
    "t5-small": Config(
        name="t5-small", encoder_layers=6, decoder_layers=6, d_model=512, heads=8, d_head=64, d_ff=2048,
        vocab=32128, max_positions=512, norm="pre", norm_type="rms", norm_eps=1e-6, positions="relative",
        attention_scale="none", bias=False, activation="relu", tied_embeddings=True, rescale_output=True,
        scale_embeddings=False, pad_id=0, bos_id=0, eos_id=1,
        description="google-t5/t5-small's shapes: tied head after a d_model^-0.5 rescale (weights: qkvflow import)",
    ),
    # --- GPT-2, Llama: decoder-only ------------------------------------------------
    "gpt2-tiny": Config(
        name="gpt2-tiny", family="decoder_only", encoder_layers=0, decoder_layers=2, d_model=18, heads=3,
        d_ff=31, vocab=59, max_positions=37, norm="pre", positions="learned", activation="gelu_tanh",
        scale_embeddings=False, pad_id=0, bos_id=58, eos_id=58,
        description="GPT-2 at a small size: pre-norm, learned positions, tanh GELU, tied output",
    ),
    "gpt2": Config(
        name="gpt2", family="decoder_only", encoder_layers=0, decoder_layers=12, d_model=768, heads=12,
        d_ff=3072, vocab=50257, max_positions=1024, norm="pre", positions="learned", activation="gelu_tanh",
        scale_embeddings=False, pad_id=-1, bos_id=50256, eos_id=50256,
        description="openai-community/gpt2's shapes, 124M (weights: qkvflow import); no padding token",
    ),
    "llama-tiny": Config(
        name="llama-tiny", family="decoder_only", encoder_layers=0, decoder_layers=2, d_model=24, heads=4,
        kv_heads=2, d_ff=19, vocab=61, max_positions=64, norm="pre", norm_type="rms", norm_eps=1e-6,
        positions="rotary", activation="silu", ffn="gated", bias=False, tied_embeddings=False,
        scale_embeddings=False, pad_id=0, bos_id=1, eos_id=2,
        description="Llama at a small size: RMSNorm, SwiGLU, rotary positions, 4 query heads sharing 2 K/V heads",
    ),
    "tinyllama-1.1b": Config(
        name="tinyllama-1.1b", family="decoder_only", encoder_layers=0, decoder_layers=22, d_model=2048,
        heads=32, kv_heads=4, d_ff=5632, vocab=32000, max_positions=2048, norm="pre", norm_type="rms",
        positions="rotary", activation="silu", ffn="gated", bias=False, tied_embeddings=False,
        scale_embeddings=False, pad_id=-1, bos_id=1, eos_id=2,
        description="TinyLlama/TinyLlama-1.1B's shapes (weights: qkvflow import); no padding token",
    ),
    # --- BERT: encoder-only --------------------------------------------------------
    "bert-tiny": Config(
        name="bert-tiny", family="encoder_only", encoder_layers=2, decoder_layers=0, d_model=26, heads=2,
        d_ff=35, vocab=67, type_vocab=2, max_positions=45, positions="learned", activation="gelu",
        embed_norm=True, norm_eps=1e-12, scale_embeddings=False, logits_bias=True, head="mlm", pad_id=0,
        bos_id=2, eos_id=3,
        description="BERT at a small size: token types, embedding LayerNorm, post-norm, masked-LM head",
    ),
    "bert-base-uncased": Config(
        name="bert-base-uncased", family="encoder_only", encoder_layers=12, decoder_layers=0, d_model=768,
        heads=12, d_ff=3072, vocab=30522, type_vocab=2, max_positions=512, positions="learned",
        activation="gelu", embed_norm=True, norm_eps=1e-12, scale_embeddings=False, logits_bias=True,
        head="mlm", pad_id=0, bos_id=101, eos_id=102,
        description="google-bert/bert-base-uncased's shapes with its masked-LM head (weights: qkvflow import)",
    ),
}


def preset(name: str) -> Config:
    if not isinstance(name, str):
        raise ConfigError(f"a preset is named by a string, got {type(name).__name__} {name!r}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; the presets are: {', '.join(sorted(PRESETS))}"
        ) from None


def did_you_mean(name: str, known) -> str:
    """' (did you mean ...?)' for a close known name, else ''."""
    import difflib
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _expect(key: str, value, want: type, origin: str) -> None:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(
            f"{origin}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}"
        )


def from_dict(values: dict, origin: str = "config") -> Config:
    """Build a Config from plain values, naming any unknown key or bad value."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    base = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: a config is a table of keys, got {type(values).__name__}")
    for key in ("preset", "family"):
        if key in values:
            _expect(key, values[key], str, origin)
    if "preset" in values:
        base = preset(values["preset"]).as_dict()
    if "family" in values and "preset" not in values:
        for key in ("encoder_layers", "decoder_layers"):  # a single-stream family has one stack
            if key not in STACKS.get(values["family"], STACKS["encoder_decoder"]):
                base.setdefault(key, 0)
        base.setdefault("head", HEADS.get(values["family"], ("lm",))[0])
    for key, value in values.items():
        if key == "preset":
            continue
        if key not in fields:
            raise ConfigError(
                f"{origin}: unknown key {key!r}{did_you_mean(key, ['preset', *fields])}; accepted keys: "
                f"preset, {', '.join(fields)}"
            )
        want = type(fields[key].default)
        _expect(key, value, want, origin)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(
                f"{origin}: {key} = {value!r} is not accepted; use one of: {', '.join(CHOICES[key])}"
            )
        base[key] = float(value) if want is float else value
    cfg = Config(**base)
    _check_family(cfg, values, origin)
    for key, positions in (("rope_theta", "rotary"), ("relative_buckets", "relative"),
                           ("relative_max_distance", "relative")):
        if key in values and values[key] != getattr(Config(), key) and cfg.positions != positions:
            raise ConfigError(f"{origin}: {key} is an option of {positions} positions, not {cfg.positions}")
    return cfg


def _check_family(cfg: Config, given: dict, origin: str) -> None:
    """Options the config's family does not have are a ConfigError naming them."""
    fam = cfg.family
    for key in ("encoder_layers", "decoder_layers"):
        if key not in STACKS[fam] and getattr(cfg, key) != 0:
            raise ConfigError(f"{origin}: a {fam} model has no {key.split('_')[0]} stack; "
                              f"{key} must be 0, got {getattr(cfg, key)}")
    for key, only in FAMILY_ONLY.items():
        if getattr(cfg, key) and fam != only:
            raise ConfigError(f"{origin}: {key} is an option of {only} models, not of {fam}")
    if cfg.head not in HEADS[fam]:
        raise ConfigError(f"{origin}: head = {cfg.head!r} is not a head of {fam} models; "
                          f"use one of: {', '.join(HEADS[fam])}")
    if cfg.pad_id < -1 or (cfg.pad_id == -1 and fam != "decoder_only"):
        raise ConfigError(f"{origin}: pad_id = {cfg.pad_id} is not accepted; a token id, or -1 (no padding "
                          "token) for a decoder_only model")
    if cfg.src_vocab and cfg.shared_embeddings:
        raise ConfigError(f"{origin}: a separate source vocabulary (src_vocab = {cfg.src_vocab}) cannot share "
                          "the target's embeddings; set shared_embeddings = false")
    if cfg.position_offset and cfg.positions != "learned":
        raise ConfigError(f"{origin}: position_offset is for learned positions, not {cfg.positions}")


def load_toml(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ValueError: a NUL in the name
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    values.setdefault("name", path.stem)
    return from_dict(values, origin=str(path))

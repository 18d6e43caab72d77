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


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "custom"
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_model: int = 512
    heads: int = 8
    d_head: int = 0  # 0: d_model // heads
    d_ff: int = 2048
    vocab: int = 32000
    max_positions: int = 512
    norm: str = "post"
    activation: str = "relu"
    positions: str = "sinusoidal"
    tied_embeddings: bool = True
    scale_embeddings: bool = True
    final_norms: bool = False
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
        return {
            "batch": None, "src": None, "tgt": None,
            "d_model": self.d_model, "heads": self.heads, "d_head": self.head_dim,
            "d_ff": self.d_ff, "vocab": self.vocab, "max_positions": self.max_positions,
        }

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The accepted values of each option: what the builder and the kernels (the op registry) implement.
CHOICES = {
    "norm": ("post", "pre"),
    "activation": OPS["activation"].choices["fn"],
    "positions": OPS["positional"].choices["kind"],
}

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
        positions="sinusoidal", tied_embeddings=False, scale_embeddings=True, final_norms=True,
        description="torch.nn.Transformer defaults (with its final norms) plus embeddings and output",
    ),
    "tiny": Config(
        name="tiny", encoder_layers=2, decoder_layers=2, d_model=21, heads=3, d_ff=29,
        vocab=41, max_positions=64, norm="post", activation="relu", positions="sinusoidal",
        tied_embeddings=True, scale_embeddings=True,
        description="2+2 layers, every dim a different size (heads 3, d_head 7, d_ff 29, vocab 41)",
    ),
}


def preset(name: str) -> Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; the presets are: {', '.join(sorted(PRESETS))}"
        ) from None


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
    if "preset" in values:
        base = preset(values["preset"]).as_dict()
    for key, value in values.items():
        if key == "preset":
            continue
        if key not in fields:
            raise ConfigError(
                f"{origin}: unknown key {key!r}; accepted keys: preset, {', '.join(fields)}"
            )
        want = type(fields[key].default)
        _expect(key, value, want, origin)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(
                f"{origin}: {key} = {value!r} is not accepted; use one of: {', '.join(CHOICES[key])}"
            )
        base[key] = float(value) if want is float else value
    return Config(**base)


def load_toml(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    values.setdefault("name", path.stem)
    return from_dict(values, origin=str(path))

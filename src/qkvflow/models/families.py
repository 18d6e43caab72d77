"""A Config's family -> its builder."""

from ..tracing.context import Model
from .config import Config

__all__ = ["build"]


def build(cfg: Config) -> Model:
    """The Model of ``cfg``, by ``cfg.family``."""
    if cfg.family == "decoder_only":
        from .decoder_only import build as family
    elif cfg.family == "encoder_only":
        from .encoder_only import build as family
    else:
        from .encoder_decoder import build as family
    return family(cfg)

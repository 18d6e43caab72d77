"""Config mistakes (QKV1xx): constraints between values, found before any run."""

import qkvflow
from qkvflow.models.config import from_dict

from .registry import bug


@bug("QKV101", "config", size_silent=False)
def d_model_not_divisible(cfg):
    """d_model 22 with 3 heads: d_head would be 7.33 (the code rounds it down to 7)."""
    return qkvflow.transformer.build(from_dict({"preset": "tiny", "name": cfg.name, "d_model": 22}))


@bug("QKV103", "config", size_silent=False)
def zero_d_ff(cfg):
    """d_ff = 0: a feed-forward with no hidden units."""
    return qkvflow.transformer.build(from_dict({"preset": "tiny", "name": cfg.name, "d_ff": 0}))


@bug("QKV104", "config", size_silent=False)
def pad_id_outside_vocab(cfg):
    """pad_id 41 with a vocabulary of 41 tokens (ids 0..40): no token is ever padding."""
    return qkvflow.transformer.build(from_dict({"preset": "tiny", "name": cfg.name, "pad_id": 41}))


@bug("QKV102", "config", size_silent=False)
def kv_heads_not_dividing_heads(cfg):
    """A grouped-query model declaring kv_heads 2 for 3 query heads."""
    model = qkvflow.transformer.build(from_dict({"preset": "tiny", "name": cfg.name}))
    model.config["kv_heads"] = 2
    return model

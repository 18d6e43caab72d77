"""What each Hugging Face family's files mean to qkvflow.

Per ``model_type``: the :class:`~qkvflow.models.config.Config` values its
``config.json`` stands for (an option qkvflow cannot represent is an
:class:`~qkvflow.errors.ConfigError`, never an approximation), and an
explicit name map, qkvflow parameter path -> :class:`Source` (the tensor's
name in the file, its tied aliases, the transpose and the part it needs),
plus the tensors the family may carry unused (buffers, heads qkvflow does
not build).
"""

import re
from typing import NamedTuple

from ..ir.errors import ConfigError

__all__ = ["Source", "Family", "FAMILIES"]


class Source(NamedTuple):
    """Where a qkvflow parameter comes from: ``key`` in the file (after the family's
    prefix), ``aliases`` that must hold the same tensor when present (tied
    weights), ``transpose`` (a (d_in, d_out) Conv1D weight), ``part`` (index, parts)
    along axis 0 after the transpose (GPT-2's packed q|k|v) and ``flat`` ((1, V) -> (V,))."""

    key: str
    aliases: tuple = ()
    transpose: bool = False
    part: tuple | None = None
    flat: bool = False


class Family(NamedTuple):
    """``base``: the base model's prefix in the names (a checkpoint of the bare base
    model lacks it), ``heads``: key prefixes outside the base model, ``strip``: a
    prefix dropped from every key, ``unused``: tensors qkvflow does not use."""

    config: object  # (config.json dict, tensor names, origin) -> Config values
    names: object  # Config -> {qkvflow path: Source}
    base: str = ""
    heads: tuple = ()
    strip: str = ""
    unused: tuple = ()

    def canonical(self, key: str) -> str:
        key = key.removeprefix(self.strip) if self.strip else key
        if self.base and not key.startswith(self.base) and not key.startswith(self.heads):
            return self.base + key
        return key


_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": None, "swish": "silu", "silu": "silu"}


def _act(name, origin: str) -> str:
    fn = _ACTIVATIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ConfigError(f"{origin}: activation {name!r} is not one qkvflow runs "
                          f"(relu, gelu, gelu_new, gelu_pytorch_tanh, silu/swish)")
    return fn


_MISSING = object()


def _need(c: dict, key: str, origin: str, default=_MISSING, *, least: int = 1) -> int:
    """An integer size of config.json (``least``: its smallest accepted value), named by its own key;
    absent or null, ``default`` (if given)."""
    value = c.get(key)
    if value is None:
        value = default
    if value is _MISSING:
        raise ConfigError(f"{origin}: config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected an integer >= {least}"[:300])
    return value


def _flag(c: dict, key: str, default: bool, origin: str) -> bool:
    value = c.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected true or false"[:300])
    return value


def _number(c: dict, key: str, default: float, origin: str) -> float:
    value = c.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected a positive number"[:300])
    return float(value)


def _text(c: dict, key: str, default: str, origin: str) -> str:
    value = c.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected a string"[:300])
    return value


def _equal(c: dict, a: str, b: str, origin: str) -> None:
    if c.get(a) != c.get(b):
        raise ConfigError(f"{origin}: {a} = {c.get(a)} and {b} = {c.get(b)} differ; qkvflow's encoder and "
                          "decoder layers have one size")


def _refuse(c: dict, origin: str, **unsupported) -> None:
    """Options whose value qkvflow cannot represent: key -> the value it can."""
    for key, accepted in unsupported.items():
        choices = accepted if isinstance(accepted, tuple) else (accepted,)
        if key in c and c[key] is not None and not any(type(c[key]) is type(a) and c[key] == a for a in choices):
            raise ConfigError(f"{origin}: {key} = {c[key]!r} is not supported by qkvflow's "
                              f"{c.get('model_type')} family (it runs {accepted!r})")


def _token(c: dict, key: str, origin: str):
    value = c.get(key)
    if isinstance(value, list) and value:  # several end tokens: qkvflow keeps the first
        value = value[0]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected a token id"[:300])
    return value


def _tokens(c: dict, origin: str, pad_default: int = 0) -> dict:
    pad, start = _token(c, "pad_token_id", origin), _token(c, "decoder_start_token_id", origin)
    bos, eos = _token(c, "bos_token_id", origin), _token(c, "eos_token_id", origin)
    return {"pad_id": pad_default if pad is None else pad,
            "bos_id": start if start is not None else (bos if bos is not None else 0),
            "eos_id": eos if eos is not None else 0}


# --- encoder–decoder: BART, Marian, T5 ------------------------------------------------------------

def _bart_like(c: dict, names: set, origin: str, *, marian: bool) -> dict:
    _equal(c, "encoder_attention_heads", "decoder_attention_heads", origin)
    _equal(c, "encoder_ffn_dim", "decoder_ffn_dim", origin)
    _refuse(c, origin, normalize_before=False, add_final_layer_norm=False, add_bias_logits=False)
    values = {
        "family": "encoder_decoder", "encoder_layers": _need(c, "encoder_layers", origin, least=0),
        "decoder_layers": _need(c, "decoder_layers", origin, least=0), "d_model": _need(c, "d_model", origin),
        "heads": _need(c, "encoder_attention_heads", origin), "d_ff": _need(c, "encoder_ffn_dim", origin),
        "vocab": _need(c, "vocab_size", origin), "max_positions": _need(c, "max_position_embeddings", origin),
        "activation": _act(c.get("activation_function", "gelu"), origin), "norm": "post", "norm_eps": 1e-5,
        "scale_embeddings": _flag(c, "scale_embedding", False, origin), "logits_bias": True,
        "tied_embeddings": _flag(c, "tie_word_embeddings", True, origin), **_tokens(c, origin, 1),
    }
    if marian:
        values.update(positions="sinusoidal_half", embed_norm=False)
        if not _flag(c, "share_encoder_decoder_embeddings", True, origin):
            values.update(shared_embeddings=False, src_vocab=values["vocab"],
                          vocab=_need(c, "decoder_vocab_size", origin, values["vocab"]))
    else:
        values.update(positions="learned", position_offset=2, embed_norm=True)
    return values


def _bart_names(cfg, *, marian: bool) -> dict:
    shared = "model.shared.weight"
    names = {}
    if cfg.shared_embeddings:
        names["encoder.embed.weight"] = Source(shared, ("model.encoder.embed_tokens.weight",
                                                        "model.decoder.embed_tokens.weight"))
    else:
        names["encoder.embed.weight"] = Source("model.encoder.embed_tokens.weight")
        names["decoder.embed.weight"] = Source("model.decoder.embed_tokens.weight")
    if cfg.tied_embeddings:
        table = "encoder.embed.weight" if cfg.shared_embeddings else "decoder.embed.weight"
        names[table] = names[table]._replace(aliases=names[table].aliases + ("lm_head.weight",))
    else:
        names["decoder.unembed.weight"] = Source("lm_head.weight")
    names["decoder.unembed.bias"] = Source("final_logits_bias", flat=True)
    for stream, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        if not marian:
            names[f"{stream}.positional.weight"] = Source(f"model.{stream}.embed_positions.weight")
            names.update(_norm(f"{stream}.embed_norm", f"model.{stream}.layernorm_embedding"))
        for i in range(layers):
            ours, theirs = f"{stream}.layers.{i}", f"model.{stream}.layers.{i}"
            blocks = [("self_attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if stream == "decoder" else [])
            for block, hf in blocks:
                for p in "qkv":
                    names.update(_linear(f"{ours}.{block}.{p}_proj", f"{theirs}.{hf}.{p}_proj"))
                names.update(_linear(f"{ours}.{block}.out_proj", f"{theirs}.{hf}.out_proj"))
            norms = ["self_attn_layer_norm"] + (["encoder_attn_layer_norm"] if stream == "decoder" else [])
            for n, hf in enumerate(norms + ["final_layer_norm"], start=1):
                names.update(_norm(f"{ours}.norm{n}", f"{theirs}.{hf}"))
            names.update(_linear(f"{ours}.linear1", f"{theirs}.fc1"))
            names.update(_linear(f"{ours}.linear2", f"{theirs}.fc2"))
    return names


def _t5_config(c: dict, names: set, origin: str) -> dict:
    proj = _text(c, "feed_forward_proj", "relu", origin)
    gated = proj.startswith("gated-")
    act = _text(c, "dense_act_fn", proj.removeprefix("gated-"), origin) if c.get("dense_act_fn") else \
        proj.removeprefix("gated-")
    tied = "lm_head.weight" not in names
    layers = _need(c, "num_layers", origin, least=0)
    rescale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True))
    if not isinstance(rescale, bool):
        raise ConfigError(f"{origin}: config.json scale_decoder_outputs / tie_word_embeddings = {rescale!r}, "
                          "expected true or false"[:300])
    return {
        "family": "encoder_decoder", "encoder_layers": layers,
        "decoder_layers": _need(c, "num_decoder_layers", origin, layers, least=0),
        "d_model": _need(c, "d_model", origin),
        "heads": _need(c, "num_heads", origin), "d_head": _need(c, "d_kv", origin),
        "d_ff": _need(c, "d_ff", origin), "vocab": _need(c, "vocab_size", origin),
        "max_positions": _need(c, "n_positions", origin, 512), "norm": "pre", "norm_type": "rms",
        "norm_eps": _number(c, "layer_norm_epsilon", 1e-6, origin), "positions": "relative",
        "relative_buckets": _need(c, "relative_attention_num_buckets", origin, 32, least=2),
        "relative_max_distance": _need(c, "relative_attention_max_distance", origin, 128, least=2),
        "attention_scale": "none", "bias": False, "ffn": "gated" if gated else "plain",
        "activation": _act(act, origin), "scale_embeddings": False, "tied_embeddings": tied,
        # transformers 5 says so in scale_decoder_outputs; before, a tied head meant rescaled
        "rescale_output": rescale, **_tokens(c, origin, 0),
    }


def _t5_names(cfg) -> dict:
    names = {"encoder.embed.weight": Source("shared.weight", ("encoder.embed_tokens.weight",
                                                               "decoder.embed_tokens.weight"))}
    if cfg.tied_embeddings:
        names["encoder.embed.weight"] = names["encoder.embed.weight"]._replace(
            aliases=names["encoder.embed.weight"].aliases + ("lm_head.weight",))
    else:
        names["decoder.unembed.weight"] = Source("lm_head.weight")
    for stream, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        names[f"{stream}.relative_bias.weight"] = Source(
            f"{stream}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        names[f"{stream}.norm.weight"] = Source(f"{stream}.final_layer_norm.weight")
        for i in range(layers):
            ours, theirs = f"{stream}.layers.{i}", f"{stream}.block.{i}.layer"
            blocks = [("self_attn", "0.SelfAttention")] + (
                [("cross_attn", "1.EncDecAttention")] if stream == "decoder" else [])
            for block, hf in blocks:
                for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
                    names[f"{ours}.{block}.{p}_proj.weight"] = Source(f"{theirs}.{hf}.{q}.weight")
            for n in range(len(blocks) + 1):
                names[f"{ours}.norm{n + 1}.weight"] = Source(f"{theirs}.{n}.layer_norm.weight")
            ff = f"{theirs}.{len(blocks)}.DenseReluDense"
            if cfg.ffn == "gated":
                names[f"{ours}.gate.weight"] = Source(f"{ff}.wi_0.weight")
                names[f"{ours}.linear1.weight"] = Source(f"{ff}.wi_1.weight")
            else:
                names[f"{ours}.linear1.weight"] = Source(f"{ff}.wi.weight")
            names[f"{ours}.linear2.weight"] = Source(f"{ff}.wo.weight")
    return names


# --- decoder-only: GPT-2, Llama -------------------------------------------------------------------

def _gpt2_config(c: dict, names: set, origin: str) -> dict:
    _refuse(c, origin, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    d = _need(c, "n_embd", origin)
    pad = _token(c, "pad_token_id", origin)
    return {
        "family": "decoder_only", "encoder_layers": 0, "decoder_layers": _need(c, "n_layer", origin, least=0),
        "d_model": d, "heads": _need(c, "n_head", origin),
        "d_ff": _need(c, "n_inner", origin, 4 * d),
        "vocab": _need(c, "vocab_size", origin), "max_positions": _need(c, "n_positions", origin),
        "norm": "pre", "norm_eps": _number(c, "layer_norm_epsilon", 1e-5, origin), "positions": "learned",
        "activation": _act(c.get("activation_function", "gelu_new"), origin), "scale_embeddings": False,
        "attention_scale": "sqrt" if _flag(c, "scale_attn_weights", True, origin) else "none",
        "tied_embeddings": True, **_tokens(c, origin), "pad_id": -1 if pad is None else pad,
    }


def _gpt2_names(cfg) -> dict:
    names = {"decoder.embed.weight": Source("wte.weight", ("lm_head.weight",)),
             "decoder.positional.weight": Source("wpe.weight"), **_norm("decoder.norm", "ln_f")}
    for i in range(cfg.decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"h.{i}"
        for n, p in enumerate("qkv"):  # c_attn packs q | k | v along its output dim
            names[f"{ours}.self_attn.{p}_proj.weight"] = Source(f"{theirs}.attn.c_attn.weight", transpose=True,
                                                                 part=(n, 3))
            names[f"{ours}.self_attn.{p}_proj.bias"] = Source(f"{theirs}.attn.c_attn.bias", part=(n, 3))
        names.update(_linear(f"{ours}.self_attn.out_proj", f"{theirs}.attn.c_proj", transpose=True))
        names.update(_linear(f"{ours}.linear1", f"{theirs}.mlp.c_fc", transpose=True))
        names.update(_linear(f"{ours}.linear2", f"{theirs}.mlp.c_proj", transpose=True))
        names.update(_norm(f"{ours}.norm1", f"{theirs}.ln_1"))
        names.update(_norm(f"{ours}.norm2", f"{theirs}.ln_2"))
    return names


def _llama_config(c: dict, names: set, origin: str) -> dict:
    rope, scaling = c.get("rope_parameters") or {}, c.get("rope_scaling") or {}
    for key, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: config.json {key} = {value!r}, expected an object"[:300])
    kinds = {rope.get("rope_type", rope.get("type", "default")), scaling.get("rope_type", scaling.get("type"))}
    unknown = sorted(str(k) for k in kinds - {None, "default"})
    if unknown:
        raise ConfigError(f"{origin}: rope type {unknown[0]!r} is not supported; "
                          "qkvflow runs the default rotary positions")
    if _flag(c, "attention_bias", False, origin) != _flag(c, "mlp_bias", False, origin):
        raise ConfigError(f"{origin}: attention_bias and mlp_bias differ; qkvflow's Llama has one bias option")
    d, heads = _need(c, "hidden_size", origin), _need(c, "num_attention_heads", origin)
    head_dim = _need(c, "head_dim", origin, d // heads)
    pad = _token(c, "pad_token_id", origin)
    tied = _flag(c, "tie_word_embeddings", False, origin) or "lm_head.weight" not in names
    theta = _number(rope, "rope_theta", 10000.0, origin) if "rope_theta" in rope else \
        _number(c, "rope_theta", 10000.0, origin)
    return {
        "family": "decoder_only", "encoder_layers": 0,
        "decoder_layers": _need(c, "num_hidden_layers", origin, least=0), "d_model": d, "heads": heads,
        "kv_heads": _need(c, "num_key_value_heads", origin, heads),
        "d_head": 0 if head_dim * heads == d else head_dim, "d_ff": _need(c, "intermediate_size", origin),
        "vocab": _need(c, "vocab_size", origin), "max_positions": _need(c, "max_position_embeddings", origin, 2048),
        "norm": "pre", "norm_type": "rms", "norm_eps": _number(c, "rms_norm_eps", 1e-6, origin),
        "positions": "rotary", "rope_theta": theta,
        "activation": _act(c.get("hidden_act", "silu"), origin), "ffn": "gated",
        "bias": _flag(c, "attention_bias", False, origin), "scale_embeddings": False, "tied_embeddings": tied,
        **_tokens(c, origin), "pad_id": -1 if pad is None else pad,
    }


def _llama_names(cfg) -> dict:
    names = {"decoder.embed.weight": Source("model.embed_tokens.weight"),
             "decoder.norm.weight": Source("model.norm.weight")}
    if cfg.tied_embeddings:
        names["decoder.embed.weight"] = Source("model.embed_tokens.weight", ("lm_head.weight",))
    else:
        names["decoder.unembed.weight"] = Source("lm_head.weight")
    for i in range(cfg.decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"model.layers.{i}"
        for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o")):
            names.update(_linear(f"{ours}.self_attn.{p}_proj", f"{theirs}.self_attn.{q}_proj", bias=cfg.bias))
        for ours_ff, hf in (("gate", "gate_proj"), ("linear1", "up_proj"), ("linear2", "down_proj")):
            names.update(_linear(f"{ours}.{ours_ff}", f"{theirs}.mlp.{hf}", bias=cfg.bias))
        names[f"{ours}.norm1.weight"] = Source(f"{theirs}.input_layernorm.weight")
        names[f"{ours}.norm2.weight"] = Source(f"{theirs}.post_attention_layernorm.weight")
    return names


# --- encoder-only: BERT ---------------------------------------------------------------------------

def _bert_config(c: dict, names: set, origin: str) -> dict:
    _refuse(c, origin, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False)
    if any(n.endswith("cls.predictions.transform.dense.weight") for n in names):
        head = "mlm"
    elif any(n.endswith("pooler.dense.weight") for n in names):
        head = "pooled"
    else:
        raise ConfigError(f"{origin}: the checkpoint has neither a masked-LM head (cls.predictions) nor a "
                          "pooler; qkvflow's BERT needs one of them")
    pad = _token(c, "pad_token_id", origin)
    return {
        "family": "encoder_only", "encoder_layers": _need(c, "num_hidden_layers", origin, least=0),
        "decoder_layers": 0, "d_model": _need(c, "hidden_size", origin),
        "heads": _need(c, "num_attention_heads", origin), "d_ff": _need(c, "intermediate_size", origin),
        "vocab": _need(c, "vocab_size", origin), "type_vocab": _need(c, "type_vocab_size", origin, 2),
        "max_positions": _need(c, "max_position_embeddings", origin), "norm": "post",
        "norm_eps": _number(c, "layer_norm_eps", 1e-12, origin), "positions": "learned",
        "activation": _act(c.get("hidden_act", "gelu"), origin), "embed_norm": True, "scale_embeddings": False,
        "logits_bias": head == "mlm", "tied_embeddings": True, "head": head, **_tokens(c, origin),
        "pad_id": pad or 0,
    }


def _bert_names(cfg) -> dict:
    e = "bert.embeddings"
    names = {"encoder.embed.weight": Source(f"{e}.word_embeddings.weight", ("cls.predictions.decoder.weight",)),
             "encoder.positional.weight": Source(f"{e}.position_embeddings.weight"),
             "encoder.token_types.weight": Source(f"{e}.token_type_embeddings.weight"),
             **_norm("encoder.embed_norm", f"{e}.LayerNorm")}
    for i in range(cfg.encoder_layers):
        ours, theirs = f"encoder.layers.{i}", f"bert.encoder.layer.{i}"
        for p, q in (("q", "query"), ("k", "key"), ("v", "value")):
            names.update(_linear(f"{ours}.self_attn.{p}_proj", f"{theirs}.attention.self.{q}"))
        names.update(_linear(f"{ours}.self_attn.out_proj", f"{theirs}.attention.output.dense"))
        names.update(_norm(f"{ours}.norm1", f"{theirs}.attention.output.LayerNorm"))
        names.update(_linear(f"{ours}.linear1", f"{theirs}.intermediate.dense"))
        names.update(_linear(f"{ours}.linear2", f"{theirs}.output.dense"))
        names.update(_norm(f"{ours}.norm2", f"{theirs}.output.LayerNorm"))
    if cfg.head == "mlm":
        names.update(_linear("encoder.transform", "cls.predictions.transform.dense"))
        names.update(_norm("encoder.transform_norm", "cls.predictions.transform.LayerNorm"))
        names["encoder.unembed.bias"] = Source("cls.predictions.bias", ("cls.predictions.decoder.bias",))
    else:
        names.update(_linear("encoder.dense", "bert.pooler.dense"))
    return names


# --- helpers and the table ------------------------------------------------------------------------

def _linear(ours: str, theirs: str, *, transpose: bool = False, bias: bool = True) -> dict:
    out = {f"{ours}.weight": Source(f"{theirs}.weight", transpose=transpose)}
    if bias:
        out[f"{ours}.bias"] = Source(f"{theirs}.bias")
    return out


def _norm(ours: str, theirs: str) -> dict:
    return {f"{ours}.weight": Source(f"{theirs}.weight"), f"{ours}.bias": Source(f"{theirs}.bias")}


_BART_HEADS = ("lm_head.", "final_logits_bias")
FAMILIES = {
    "bart": Family(lambda c, n, o: _bart_like(c, n, o, marian=False), lambda cfg: _bart_names(cfg, marian=False),
                   base="model.", heads=_BART_HEADS),
    "marian": Family(lambda c, n, o: _bart_like(c, n, o, marian=True), lambda cfg: _bart_names(cfg, marian=True),
                     base="model.", heads=_BART_HEADS,
                     unused=(re.compile(r"model\.(en|de)coder\.embed_positions\.weight"),)),
    "t5": Family(_t5_config, _t5_names),
    "gpt2": Family(_gpt2_config, _gpt2_names, strip="transformer.",
                   unused=(re.compile(r"h\.\d+\.attn\.(masked_)?bias"),)),
    "llama": Family(_llama_config, _llama_names, base="model.", heads=("lm_head.",),
                    unused=(re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)),
    "bert": Family(_bert_config, _bert_names, base="bert.", heads=("cls.",),
                   unused=(re.compile(r"bert\.embeddings\.position_ids"),
                           re.compile(r"cls\.seq_relationship\.(weight|bias)"),
                           re.compile(r"bert\.pooler\.dense\.(weight|bias)"))),
}

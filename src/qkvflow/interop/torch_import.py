"""A ``torch.nn.Transformer`` state_dict as qkvflow parameters: the inverse of :mod:`.torch_export`.

:func:`from_torch_state_dict` reads the names an ``nn.Transformer`` state_dict
has (``encoder.layers.{i}.self_attn.in_proj_weight``, ``...linear1.weight``,
``...norm1.bias``, ``encoder.norm.weight``; the decoder's
``multihead_attn`` and ``norm3``), optionally under one common prefix such as
``transformer.`` (found by itself), splits each packed ``in_proj`` (3E, E)
into ``q_proj``, ``k_proj`` and ``v_proj`` and renames ``multihead_attn`` to
qkvflow's ``cross_attn``. The tables torch has no module for (token
embeddings, learned positions, the output projection) come from
``embeddings=`` or from keys of ``state`` with their qkvflow names.

Every tensor is checked against the shape the traced graph expects; a missing,
misshapen, non-float, non-finite or left-over tensor is a
:class:`~qkvflow.ir.errors.ParamError` naming it. torch itself is never
imported: a torch tensor is recognised by its ``detach`` method.
"""

import difflib
import re
from collections import Counter

import numpy as np

from ..ir.dims import describe_shape, size_of
from ..ir.errors import ConfigError, ParamError
from ..models.config import Config

__all__ = ["from_torch_state_dict"]

# qkvflow paths that an nn.Transformer state_dict holds (everything else is a table torch lacks).
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(self_attn|cross_attn|linear1|linear2|norm1|norm2|norm3)"
                    r"\.(.+)$")
_FINAL = re.compile(r"^(encoder|decoder)\.norm\.(weight|bias)$")
_PROJ = re.compile(r"^([qkv])_proj\.(weight|bias)$")
_TORCH_ATTN = {"self_attn": "self_attn", "cross_attn": "multihead_attn"}
_WHAT = {"embed": "token embedding table", "unembed": "output projection", "positional": "learned position table"}


def _unsupported(cfg: Config) -> str | None:
    """Why torch.nn.Transformer layers cannot carry ``cfg``'s weights, or None."""
    if cfg.family != "encoder_decoder":
        return f"the family is {cfg.family}, not encoder_decoder"
    if cfg.norm_type != "layer":
        return f"norm_type is {cfg.norm_type!r}; nn.Transformer uses LayerNorm"
    if cfg.ffn != "plain":
        return f"ffn is {cfg.ffn!r}; nn.Transformer's feed-forward is linear1 -> activation -> linear2"
    if not cfg.bias:
        return "bias is false; nn.Transformer(bias=False) also drops its LayerNorm biases, which qkvflow keeps"
    if cfg.kv_heads and cfg.kv_heads != cfg.heads:
        return f"kv_heads {cfg.kv_heads} != heads {cfg.heads}; nn.MultiheadAttention has no grouped-query attention"
    if cfg.heads * cfg.head_dim != cfg.d_model:
        return f"heads * d_head = {cfg.heads * cfg.head_dim} != d_model {cfg.d_model}"
    if cfg.attention_scale != "sqrt":
        return f"attention_scale is {cfg.attention_scale!r}; nn.MultiheadAttention scales by 1/sqrt(d_head)"
    if cfg.positions in ("rotary", "relative"):
        return f"positions are {cfg.positions}; nn.MultiheadAttention has no {cfg.positions} positions"
    return None


def _array(name: str, value) -> np.ndarray:
    """A NumPy array of a torch tensor (duck-typed) or anything array-like."""
    if hasattr(value, "detach"):
        tensor = value.detach().cpu()
        try:
            return np.asarray(tensor)
        except TypeError:  # bfloat16 has no NumPy dtype: widen (exactly) to float32
            return np.asarray(tensor.float())
    try:
        return np.asarray(value)
    except Exception as err:
        raise ParamError(f"tensor {name} is a {type(value).__name__}, not an array ({err})") from None


def _sources(cfg: Config, specs: dict, dims: dict) -> tuple[dict, dict]:
    """Torch name (unprefixed) -> (torch shape, [(qkvflow path, rows or None)]); qkvflow extra path -> shape."""
    sources: dict = {}
    extras: dict = {}
    packed: dict = {}
    for path in sorted(specs):
        sizes = tuple(size_of(n, dims) for n in specs[path])
        layer = _LAYER.match(path)
        if layer is None:
            if _FINAL.match(path):
                sources[path] = (sizes, [(path, None)])
            elif re.match(r"^(encoder|decoder)\.layers\.", path):
                raise ConfigError(f"parameter {path} has no counterpart in torch.nn.Transformer's state_dict")
            else:
                extras[path] = sizes
            continue
        stack, index, module, rest = layer.groups()
        prefix = f"{stack}.layers.{index}"
        if module not in _TORCH_ATTN:
            sources[path] = (sizes, [(path, None)])
            continue
        attn = f"{prefix}.{_TORCH_ATTN[module]}"
        proj = _PROJ.match(rest)
        if proj is None:
            sources[f"{attn}.{rest}"] = (sizes, [(path, None)])
        else:
            packed.setdefault(f"{attn}.in_proj_{proj.group(2)}", {})[proj.group(1)] = (path, sizes)
    for name, parts in packed.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConfigError(f"{name} packs q, k and v, but the config's graph has only {', '.join(sorted(parts))}")
        offset, split = 0, []
        for p in "qkv":
            path, sizes = parts[p]
            split.append((path, slice(offset, offset + sizes[0])))
            offset += sizes[0]
        sources[name] = ((offset,) + parts["q"][1][1:], split)
    return dict(sorted(sources.items())), extras


def _detect_prefix(keys, names: set) -> str:
    """The common prefix (``""``, ``"transformer."``) under which ``keys`` hold the torch names."""
    counts: Counter = Counter()
    for key in keys:
        for start in [0] + [i + 1 for i, c in enumerate(key) if c == "."]:
            if key[start:] in names:
                counts[key[:start]] += 1
                break
    if not counts:
        return ""
    (best, n), *others = counts.most_common()
    ties = [p for p, m in others if m == n]
    if ties:
        shown = ", ".join(repr(p) for p in [best, *ties])
        raise ParamError(f"state holds torch.nn.Transformer tensors under several prefixes ({shown}); "
                         "pass the state_dict of one transformer")
    return best


def _hint(name: str, prefix: str, cfg: Config) -> str:
    """Why a left-over tensor has no place in ``cfg``'s parameters, when the config explains it."""
    bare = name[len(prefix):] if name.startswith(prefix) else name
    if _FINAL.match(bare):
        return (f"config {cfg.name!r} has no final norms, which nn.Transformer always adds, "
                "so set final_norms = true")
    layer = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.", bare)
    if layer and int(layer.group(2)) >= getattr(cfg, f"{layer.group(1)}_layers"):
        count = getattr(cfg, f"{layer.group(1)}_layers")
        return f"config {cfg.name!r} has {count} {layer.group(1)} layers"
    if bare == "decoder.embed.weight" and cfg.shared_embeddings:
        return f"config {cfg.name!r} shares encoder.embed.weight with the decoder: shared_embeddings = true"
    if bare == "decoder.unembed.weight" and cfg.tied_embeddings:
        return f"config {cfg.name!r} ties the output projection to the decoder's embedding: tied_embeddings = true"
    if bare.endswith("positional.weight") and cfg.positions != "learned":
        return f"config {cfg.name!r} has {cfg.positions} positions, which have no table"
    return ""


def from_torch_state_dict(state: dict, cfg: Config, *, embeddings: dict | None = None) -> dict[str, np.ndarray]:
    """qkvflow parameters (path -> array) from a ``torch.nn.Transformer`` state_dict.

    ``state`` maps names to torch tensors or NumPy arrays: an
    ``nn.Transformer``'s ``state_dict()``, possibly under a common prefix
    (``transformer.encoder.layers.0...`` when the transformer is a submodule
    ``self.transformer``). ``embeddings`` gives the tables torch has no module
    for, by qkvflow name (``encoder.embed.weight``, ``decoder.embed.weight``,
    ``decoder.unembed.weight``, ``encoder.positional.weight``,
    ``decoder.positional.weight``, as ``cfg`` has them); a value is an array or
    tensor, or a string naming a key of ``state`` to take it from
    (``{"encoder.embed.weight": "src_embed.weight"}``). Such tables may also
    be keys of ``state`` under their qkvflow names (with or without the prefix).

    Arrays keep their dtype (bfloat16 becomes float32) and are copies, never
    views of the torch tensors. The layers' activation, norm placement and eps
    are ``cfg``'s: build the nn.Transformer with the same ones.

    Raises ConfigError when ``cfg`` is not a model nn.Transformer layers can
    compute, and ParamError naming the first missing, misshapen, non-float,
    non-finite or left-over tensor (with the closest expected name).
    """
    from ..models.loader import load_model
    from ..run.params import param_specs, validate_params
    from ..tracing.tracer import trace

    if not isinstance(cfg, Config):
        raise ConfigError(f"from_torch_state_dict needs a qkvflow Config, got {type(cfg).__name__}")
    why = _unsupported(cfg)
    if why:
        raise ConfigError(f"config {cfg.name!r} cannot take torch.nn.Transformer weights: {why}")
    if not hasattr(state, "items"):
        raise ParamError(f"state must be a dict of tensors (a state_dict()), got {type(state).__name__}")
    graph = trace(load_model(cfg))
    dims = graph.graph["dims"]
    specs = param_specs(graph)
    sources, extras = _sources(cfg, specs, dims)

    pending = {str(k): v for k, v in state.items()}
    prefix = _detect_prefix(pending, set(sources))
    tables: dict = {}  # qkvflow extra path -> (where it came from, value)
    for key, value in (embeddings or {}).items():
        if key not in extras:
            close = difflib.get_close_matches(key, list(extras), n=1)
            hint = _hint(key, "", cfg)
            raise ParamError(f"embeddings[{key!r}] is not a table config {cfg.name!r} needs; "
                             + (hint if hint else f"did you mean {close[0]!r}?" if close else
                                f"it needs {', '.join(sorted(extras)) or 'none'}"))
        if isinstance(value, str):
            if value not in pending:
                raise ParamError(f"embeddings[{key!r}] names state tensor {value!r}, which is not in state")
            value, where = pending.pop(value), f"state[{value!r}]"
        else:
            where = f"embeddings[{key!r}]"
        tables[key] = (where, value)
    for path in extras:
        for key in dict.fromkeys([path, prefix + path]):
            if key in pending:
                if path in tables:
                    raise ParamError(f"table {path} is given twice, as {tables[path][0]} and as state[{key!r}]")
                tables[path] = (f"state[{key!r}]", pending.pop(key))

    expected = {prefix + name: name for name in sources}
    leftover = [k for k in pending if k not in expected]
    if leftover:
        key = leftover[0]
        missing = [n for n in expected if n not in pending] + [p for p in extras if p not in tables]
        close = difflib.get_close_matches(key, missing, n=1) or difflib.get_close_matches(
            key, list(expected) + list(extras), n=1)
        hint = _hint(key, prefix, cfg)
        raise ParamError(f"tensor {key} is not a parameter of torch.nn.Transformer for config {cfg.name!r}"
                         + (f"; {hint}" if hint else f"; did you mean {close[0]}?" if close else ""))

    def checked(where: str, value, want: tuple, shape_text: str) -> np.ndarray:
        arr = _array(where, value)
        if tuple(arr.shape) != want:
            raise ParamError(f"tensor {where} has shape {tuple(arr.shape)}, expected {shape_text} = {want}")
        if arr.dtype.kind != "f":
            raise ParamError(f"tensor {where} has dtype {arr.dtype}, expected a float dtype")
        if not np.all(np.isfinite(arr)):
            raise ParamError(f"tensor {where} contains NaN or infinite values, expected finite weights")
        return arr

    params: dict = {}
    for full, name in expected.items():
        want, parts = sources[name]
        if len(parts) == 1:
            text = describe_shape(specs[parts[0][0]], dims)
        else:
            first = specs[parts[0][0]]
            text = "(" + f"{len(parts)}*{first[0]}" + "".join(f", {n}" for n in first[1:]) + ")"
        if full not in pending:
            raise ParamError(f"tensor {full} is missing from the state_dict, expected {text} = {want}")
        arr = checked(full, pending[full], want, text)
        for path, rows in parts:
            params[path] = (arr if rows is None else arr[rows]).copy()
    for path, want in extras.items():
        text = describe_shape(specs[path], dims)
        kind = _WHAT.get(path.split(".")[1], "table")
        if path not in tables:
            raise ParamError(f"the {kind} {path} {text} = {want} is missing: torch.nn.Transformer has no such "
                             "tensor, so pass it in embeddings= (or as a state key of that name)")
        where, value = tables[path]
        params[path] = checked(where, value, want, text).copy()
    validate_params(graph, params)
    return params

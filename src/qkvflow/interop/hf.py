"""Import a local Hugging Face model folder: ``config.json`` + safetensors.

``import_hf(PATH)`` reads the folder (``model.safetensors``, or the shards
a ``model.safetensors.index.json`` lists), turns ``config.json`` into a
qkvflow :class:`~qkvflow.models.config.Config` of the matching family and
every tensor into the qkvflow parameter its family's name map
(:mod:`.hf_families`) says, transposed or split where needed and checked
against the shape the traced graph expects. A tensor left over is an error
naming it, unless the family lists it as unused. Nothing here imports
``transformers`` or ``torch``; weights never load through pickle.
"""

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np

from ..ir.dims import size_of
from ..ir.errors import ConfigError, ModelLoadError, ParamError
from ..models.config import from_dict
from .hf_families import FAMILIES, Family, Source

__all__ = ["Imported", "import_hf", "read_folder"]


@dataclasses.dataclass
class Imported:
    """A model imported from a folder: its config, traced graph, params and what was left unused."""

    config: object
    model: object
    params: dict
    unused: list
    origin: str


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: cannot be read as JSON: {err}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _bf16(path: Path, names: list) -> dict:
    """bfloat16 tensors NumPy has no dtype for, widened exactly to float32 (the header
    gives each tensor's byte range; bfloat16 is the top half of a float32)."""
    out = {}
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for name in names:
            meta = header[name]
            start, stop = meta["data_offsets"]
            f.seek(8 + size + start)
            raw = np.frombuffer(f.read(stop - start), dtype="<u2")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])
    return out


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        tensors, later = {}, []
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                try:
                    tensors[name] = f.get_tensor(name)
                except (TypeError, ValueError, SafetensorError) as err:
                    if "bf16" not in str(err).lower() and "bfloat16" not in str(err).lower():
                        raise
                    later.append(name)
        tensors.update(_bf16(path, later))
        return tensors
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {str(path)!r} does not exist") from None
    except (OSError, SafetensorError, ValueError, TypeError, KeyError, struct.error) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file: {err}") from None


def read_folder(path) -> tuple[dict, dict]:
    """(config.json, {tensor name: array}) of a Hugging Face model folder."""
    folder = Path(path)
    if folder.is_file():
        raise ModelLoadError(f"{str(folder)!r} is a file; expected the Hugging Face model folder holding "
                             "config.json and the safetensors")
    if not folder.is_dir():
        raise ModelLoadError(f"Hugging Face model folder {str(folder)!r} does not exist")
    config = _read_json(folder / "config.json", "the model's config")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return config, _read_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: has no weight_map of tensor name -> shard file")
        bad = next((s for s in weight_map.values() if not isinstance(s, str) or Path(s).name != s), None)
        if bad is not None:
            raise ModelLoadError(f"{index}: shard {bad!r} is not a file name in the folder"[:300])
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            held = _read_safetensors(folder / shard)
            stray = sorted(name for name in held if weight_map.get(name) != shard)
            if stray:  # the index says where every tensor is; a shard may not contradict it
                raise ModelLoadError(f"{folder / shard}: holds tensor {stray[0]}, which the index "
                                     f"{'puts in ' + repr(weight_map[stray[0]]) if stray[0] in weight_map else 'does not list'}")
            tensors.update(held)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ModelLoadError(f"{index}: tensor {missing[0]} is listed in {weight_map[missing[0]]!r} but "
                                 "is not there")
        return config, tensors
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(f"{folder}: has only pickled weights (.bin/.pt); qkvflow reads safetensors only, "
                             "never pickle (convert with save_pretrained(..., safe_serialization=True))")
    raise ModelLoadError(f"{folder}: no model.safetensors and no model.safetensors.index.json")


def _family(config: dict, origin: str) -> tuple[str, Family]:
    kind = config.get("model_type")
    if kind is None:
        raise ConfigError(f"{origin}: config.json has no model_type; qkvflow imports {', '.join(FAMILIES)}")
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise ConfigError(f"{origin}: model_type {kind!r} is not supported; qkvflow imports "
                          f"{', '.join(FAMILIES)}"[:300])
    return kind, FAMILIES[kind]


def _take(tensors: dict, source: Source, want: tuple, path: str, origin: str, used: set,
          shown=lambda key: key) -> np.ndarray:
    """The tensor of ``source`` made into the parameter ``path`` of shape ``want``;
    ``shown`` gives a key's name as the file writes it, for messages."""
    if source.key not in tensors:
        present = [a for a in source.aliases if a in tensors]
        if not present:
            raise ParamError(f"{origin}: tensor {shown(source.key)} (for {path}) is missing")
        key, aliases = present[0], [a for a in source.aliases if a != present[0]]
    else:
        key, aliases = source.key, list(source.aliases)
    value = tensors[key]
    used.add(key)
    for alias in aliases:
        if alias in tensors:
            if tensors[alias].shape != value.shape or not np.array_equal(tensors[alias], value):
                raise ParamError(f"{origin}: {shown(alias)} should be the same tied weight as {shown(key)}, "
                                 "but differs")
            used.add(alias)
    if source.transpose:
        value = value.T
    if source.part is not None:
        index, parts = source.part
        if value.shape[0] % parts:
            raise ParamError(f"{origin}: {shown(key)} has {value.shape[0]} rows, not {parts} equal parts")
        step = value.shape[0] // parts
        value = value[index * step:(index + 1) * step]
    if source.flat:
        value = value.reshape(-1)
    if tuple(value.shape) != tuple(want):
        raise ParamError(f"{origin}: tensor {shown(key)} gives {path} the shape {tuple(value.shape)}, "
                         f"expected {tuple(want)}")
    if value.dtype.kind != "f":
        raise ParamError(f"{origin}: tensor {shown(key)} holds {value.dtype}, expected floats")
    return np.ascontiguousarray(value)


def import_hf(path) -> Imported:
    """The qkvflow model and params of a local Hugging Face folder (see module doc)."""
    from ..models.families import build
    from ..run.params import param_specs
    from ..tracing.tracer import trace

    origin = str(path)
    config, raw = read_folder(path)
    kind, family = _family(config, origin)
    tensors = {family.canonical(k): v for k, v in raw.items()}
    written = {family.canonical(k): k for k in raw}  # for messages: names as the file has them
    try:
        values = family.config(config, set(tensors), origin)
    except (TypeError, AttributeError, ValueError) as err:  # a value of a type the family does not expect
        raise ConfigError(f"{origin}: config.json has a value of the wrong type: {err}"[:300]) from None
    name = config.get("_name_or_path") or Path(path).resolve().name or kind
    cfg = from_dict({**values, "name": str(name)[:80],
                     "description": f"imported from {origin} ({kind})"}, origin=f"{origin}/config.json")
    model = build(cfg)
    graph = trace(model)
    specs = param_specs(graph)
    names = family.names(cfg)
    missing = sorted(set(specs) - set(names))
    if missing:  # a name map that does not cover the builder is qkvflow's bug, said plainly
        raise ParamError(f"{origin}: qkvflow's {kind} name map has no source for {missing[0]}")
    used: set = set()
    sizes = graph.graph["dims"]
    params = {p: _take(tensors, names[p], tuple(size_of(n, sizes) for n in specs[p]), p, origin, used,
                       lambda k: written.get(k, k)) for p in specs}
    left = sorted(set(tensors) - used)
    unused = [k for k in left if any(rx.fullmatch(k) for rx in family.unused)]
    extra = [k for k in left if k not in unused]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ParamError(f"{origin}: tensor {written[extra[0]]}{more} has no place in qkvflow's {kind} model")
    for p, v in params.items():
        if not np.isfinite(v).all():
            raise ParamError(f"{origin}: parameter {p} holds NaN or infinite values")
    return Imported(cfg, model, step_layout(graph, params), unused, origin)


def step_layout(graph, params: dict) -> dict:
    """The same parameters, projection weights (d_out, d_in) laid out column-major: the
    layout BLAS reads fastest for one token at a time (a generation step), as fast for a batch."""
    from ..ir.graph import param_path
    out = dict(params)
    for node, data in graph.nodes(data=True):
        if data["op"] in ("linear", "unembed"):
            key = data["attrs"].get("tied_to") or param_path(node, "weight")
            if key in out and out[key].ndim == 2:
                out[key] = np.asfortranarray(out[key])
    return out

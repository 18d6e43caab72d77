"""Parameters named by node path: initialise, validate, save and load.

Files are safetensors (``.safetensors``) or NumPy ``.npz``; neither is ever
read through pickle. Writes are atomic (a temporary file, then a rename).
"""

import io
import math
import os
import weakref
from pathlib import Path

import networkx as nx
import numpy as np

from ..atomic import OutputError, write_atomic
from ..ir.dims import describe_shape, size_of
from ..ir.dtypes import run_dtype
from ..ir.errors import ParamError
from ..ir.graph import param_path
from ..ir.ops import spec
from ..ir.text import printable

__all__ = ["param_specs", "init_params", "validate_params", "save_params", "load_params", "nest_params"]


def param_specs(g: nx.MultiDiGraph) -> dict[str, tuple]:
    """Every parameter of the graph: path -> named shape."""
    return {path: shape for path, (_, _, shape) in _owners(g).items()}


def _owners(g: nx.MultiDiGraph) -> dict[str, tuple]:
    """Parameter path -> (node, parameter name, named shape)."""
    return {param_path(node, name): (node, name, tuple(shape))
            for node, data in g.nodes(data=True) for name, shape in data.get("params", {}).items()}


def _sizes(g: nx.MultiDiGraph, shape: tuple) -> tuple:
    return tuple(size_of(n, g.graph["dims"]) for n in shape)


def init_params(g: nx.MultiDiGraph, seed: int = 0, dtype="float64") -> dict[str, np.ndarray]:
    """Seeded parameters for every node of ``g``, by each op's initialisers
    (:data:`qkvflow.ir.ops.INITS`): linear weights ~ N(0, 1/d_in),
    embeddings ~ N(0, 1/d_model), learned positions ~ N(0, 0.02); norm
    weights 1; biases 0.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParamError(f"seed must be a non-negative integer, got {seed!r}")
    dtype = run_dtype(dtype)
    owners = sorted(_owners(g).items())
    shapes = {}
    for path, (_, _, shape) in owners:
        shapes[path] = _sizes(g, shape)
        if any(s is None or s <= 0 for s in shapes[path]):
            raise ParamError(f"parameter {path} has shape {shape} without positive sizes")
    counts = [math.prod(s) for s in shapes.values()]
    # all of them in dtype, and the largest drawn in float64 before its cast
    check_fits(sum(counts) * dtype.itemsize + 8 * max(counts, default=0),
               f"the parameters of model {g.graph.get('model', '?')!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for path, (node, leaf, shape) in owners:
        sizes = shapes[path]
        op = g.nodes[node]["op"]
        init = g.nodes[node]["attrs"].get("init") or spec(op).init.get(leaf)
        if init is None:
            raise ParamError(f"parameter {path}: op {op!r} declares no initialiser for {leaf!r}")
        if init == "zeros":
            value = np.zeros(sizes)
        elif init == "ones":
            value = np.ones(sizes)
        elif init == "small":
            value = rng.normal(0.0, 0.02, sizes)
        elif init == "fan_in_first":
            value = rng.normal(0.0, sizes[0] ** -0.5, sizes)
        else:  # fan_in
            value = rng.normal(0.0, sizes[-1] ** -0.5, sizes)
        out[path] = value.astype(dtype)
    return out


def memory_available() -> int | None:
    """Bytes of memory this machine can still give, or None where that cannot be read."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """A ParamError when ``nbytes`` exceed the memory available: said before allocating,
    instead of a MemoryError, or the operating system ending the process."""
    have = memory_available()
    if have is not None and nbytes > have:
        raise ParamError(f"{what} need {_bytes(nbytes)}; this machine has {_bytes(have)} of memory available")


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EB"


# Arrays already read and found finite, by id: the weak reference tells a reused id apart
# and drops the entry when the array goes. Reading 63M weights costs as much as a short
# forward pass; an array changed in place after its reading is caught by the executor
# (outputs that are not finite make it read every parameter again).
_READ_FINITE: dict[int, weakref.ref] = {}


# Per graph: its parameters' named shapes and sizes, by path in sorted order (a forward
# through qf.forward validates them on every call).
_EXPECTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _expected(g: nx.MultiDiGraph) -> tuple[dict, list]:
    table = _EXPECTED.get(g)
    if table is None:
        specs = param_specs(g)
        table = _EXPECTED[g] = (specs, [(path, shape, _sizes(g, shape)) for path, shape in sorted(specs.items())])
    return table


def validate_params(g: nx.MultiDiGraph, params: dict, *, reread: bool = False) -> bool:
    """Raise ParamError naming the first missing, misshapen or non-finite parameter.

    An array found finite before is not read again unless ``reread``; returns
    whether every array was read now."""
    dims = g.graph["dims"]
    specs, expected = _expected(g)
    if len(params) != len(specs) or not all(k in specs for k in params):
        _refuse_unknown_names(g, params, specs)
    read_all = True
    for path, shape, want in expected:
        if path not in params:
            raise ParamError(f"parameter {path} {describe_shape(shape, dims)} is missing")
        value = params[path]
        if not isinstance(value, np.ndarray):
            raise ParamError(f"parameter {path} is a {type(value).__name__}, expected a NumPy array")
        if tuple(value.shape) != want:
            raise ParamError(
                f"parameter {path} has shape {tuple(value.shape)}, expected "
                f"{describe_shape(shape, dims)} = {want}"
            )
        if value.dtype.kind != "f":
            raise ParamError(f"parameter {path} has dtype {value.dtype}, expected a float dtype")
        ref = _READ_FINITE.get(id(value))
        if not reread and ref is not None and ref() is value:
            read_all = False
            continue
        if not all_finite(value):
            raise ParamError(f"parameter {path} contains NaN or infinite values")
        _remember_finite(value)
    return read_all


def _refuse_unknown_names(g: nx.MultiDiGraph, params: dict, specs: dict) -> None:
    """A name the model does not have is a ParamError naming it and the closest one it has
    (a misspelling would otherwise leave the real parameter missing, or be ignored)."""
    import difflib
    for name in params:
        if not isinstance(name, str):
            raise ParamError(f"parameter names are strings (node paths), got {type(name).__name__} {name!r}")
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1, cutoff=0.5)
            hint = f"; the closest it has is {close[0]}" if close else ""
            raise ParamError(f"{printable(name)} is not a parameter of model {g.graph.get('model', '?')!r}{hint}")


def _remember_finite(value) -> None:
    try:
        key = id(value)
        _READ_FINITE[key] = weakref.ref(value, lambda _, key=key: _READ_FINITE.pop(key, None))
    except TypeError:  # an array type without weak references: read it each time
        pass


def all_finite(value: np.ndarray) -> bool:
    """Whether every entry is finite. The sum of squares (one BLAS pass, no temporary) is
    finite when they all are (a NaN or infinity propagates); only when it is not, because
    of them or of an overflow, are the entries looked at one by one."""
    flat = np.ravel(value, order="K")
    with np.errstate(over="ignore", invalid="ignore"):
        if flat.size and np.isfinite(np.dot(flat, flat)):
            return True
    return bool(np.all(np.isfinite(flat)))


def save_params(params: dict, path: str | os.PathLike) -> Path:
    """Write ``params`` to ``.safetensors`` or ``.npz`` atomically."""
    path = Path(path)
    arrays = _plain_arrays(params)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz"):
        raise ParamError(f"cannot save parameters to {str(path)!r}: use a .safetensors or .npz file")
    if suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        payload = buffer.getvalue()
    else:
        from safetensors.numpy import save
        payload = save(arrays)
    try:
        write_atomic(path, payload)
    except OutputError as err:
        raise ParamError(str(err)) from None
    return path


def _plain_arrays(params) -> dict:
    """name -> contiguous numeric array; anything a file could only hold through pickle
    (objects, strings, ragged lists) is a ParamError naming it."""
    if not isinstance(params, dict):
        raise ParamError(f"params must be a dict of name -> array, got {type(params).__name__}")
    arrays = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise ParamError(f"parameter names are non-empty strings, got {type(name).__name__} {name!r}")
        try:
            array = np.ascontiguousarray(value)
        except (ValueError, TypeError) as err:
            raise ParamError(f"parameter {name} is not an array of one shape: {err}") from None
        if array.dtype.kind not in "biuf":
            raise ParamError(f"parameter {name} has dtype {array.dtype}, expected numbers (bool, int or float); "
                             "other values would need pickle, which qkvflow never writes")
        arrays[name] = array
    return arrays


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read parameters from ``.safetensors`` or ``.npz`` (never via pickle)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ParamError(f"parameter file {str(path)!r} does not exist")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file
            return dict(load_file(str(path)))
    except ParamError:
        raise
    except Exception as err:
        raise ParamError(f"parameter file {str(path)!r} cannot be read: {err}") from None
    raise ParamError(f"parameter file {str(path)!r}: expected .safetensors or .npz")


def nest_params(params: dict) -> dict:
    """Flat parameters by path (``blocks.0.attn.c_attn.w``) as the nested dicts and
    lists a NumPy model keeps its weights in (``{"blocks": [{"attn": {"c_attn": {"w": ...}}}]}``):
    a level whose keys are 0..n-1 becomes a list.

    >>> nest_params({"h.0.w": 1, "h.1.w": 2, "ln.g": 3})
    {'h': [{'w': 1}, {'w': 2}], 'ln': {'g': 3}}
    """
    tree: dict = {}
    for path, value in params.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def lists(node):
        if not isinstance(node, dict):
            return node
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [lists(node[str(i)]) for i in range(len(node))]
        return {k: lists(v) for k, v in node.items()}

    return lists(tree)


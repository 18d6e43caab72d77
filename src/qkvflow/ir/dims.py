"""Named dims: the vocabulary every shape in qkvflow is written in.

A shape is a tuple of dim *names*. Model dims (``d_model``, ``heads``,
``d_head``, ``d_ff``, ``vocab``, ...) have sizes from the config; data dims
(``batch``, ``src``, ``tgt``, ``seq``, ...) are free symbols bound at run
time. Some data dims are *sequence* dims: the token positions attention
mixes. A model declares which (``src``/``tgt`` for an encoder–decoder,
``seq`` for a decoder-only model, any names it likes); a
:class:`DimTable` carries that declaration beside the sizes. A name may be a
product of names, ``"heads*d_head"``, and ``"1"`` is the broadcast dim.

While tracing, ``x.shape`` yields :class:`Dim` (an ``int`` that remembers its
name, so ``np.sqrt(d_head)`` works) for sized dims and :class:`DataDim` for
free ones, so user code can pass them straight back to ``reshape``.
"""

__all__ = [
    "Dim",
    "DataDim",
    "DimTable",
    "name_of",
    "factors",
    "size_of",
    "describe",
    "describe_shape",
    "dim_table",
    "sequence_of",
    "dims_of_size",
]


class DimTable(dict):
    """Sizes by dim name (None for data dims), the set of sequence dims and the
    aliases a model declares (``{"d_v": "d_head", "d_model": "heads*d_head"}``)."""

    def __init__(self, sizes: dict, seq=(), aliases: dict | None = None) -> None:
        super().__init__(sizes)
        self.seq = set(seq)
        self.aliases = dict(aliases or {})

    def atoms(self, name: str) -> list:
        """The factors of ``name`` with aliases expanded, sorted: what two names must share
        to be one dim (``d_k*heads`` and ``heads*d_head`` are, given ``d_k = d_head``)."""
        out = []
        for part in factors(name):
            alias = self.aliases.get(part)
            out.extend(self.atoms(alias) if alias and alias != part else [part])
        return sorted(out)

    def same(self, a: str, b: str) -> bool:
        """Equal names, the same factors, or a literal size (``2*2``) and a dim of that size."""
        if a == b or self.atoms(a) == self.atoms(b):
            return True
        literal = [n for n in (a, b) if all(f.isdigit() for f in factors(n)) and n != "1"]
        return bool(literal) and size_of(a, self) is not None and size_of(a, self) == size_of(b, self)

    def seq_of(self, name: str) -> str | None:
        """The sequence dim a (possibly composite) dim name runs over, if any."""
        return sequence_of(name, self.seq)


def sequence_of(name: str, sequences) -> str | None:
    """The first factor of dim ``name`` that is one of ``sequences``, if any."""
    return next((part for part in factors(name) if part in sequences), None)


def dims_of_size(sizes: dict, size: int) -> list:
    """The model dims of ``size``: a bare size names a dim when it is the only one."""
    return [name for name, s in sizes.items() if s is not None and s == size]


def dim_table(graph_attrs: dict) -> DimTable:
    """The dims table of a graph (``g.graph``) with its declared sequence dims."""
    return DimTable(graph_attrs.get("dims", {}), graph_attrs.get("sequences", {}), graph_attrs.get("aliases"))


class Dim(int):
    """A model dim with a known size: an ``int`` that carries its name."""

    name: str

    def __new__(cls, name: str, size: int) -> "Dim":
        obj = super().__new__(cls, size)
        obj.name = name
        return obj

    def __repr__(self) -> str:
        return f"{self.name}={int(self)}"

    def __reduce__(self):
        return (Dim, (self.name, int(self)))

    def __mul__(self, other):
        # heads * d_head stays a named dim, so reshape(B, T, H * Dh) is traceable.
        if isinstance(other, Dim):
            return Dim(f"{self.name}*{other.name}", int(self) * int(other))
        if isinstance(other, DataDim):
            return DataDim(f"{self.name}*{other.name}")
        return int(self) * other

    __rmul__ = __mul__

    def __floordiv__(self, other):
        # (heads*d_head) // heads is d_head by name; other quotients are plain sizes.
        if isinstance(other, Dim) and other.name in factors(self.name) and int(other):
            rest = list(factors(self.name))
            rest.remove(other.name)
            return Dim("*".join(rest) or "1", int(self) // int(other))
        return int(self) // other


class DataDim:
    """A data dim (batch, src, tgt) whose size is only known at run time."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataDim) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("DataDim", self.name))

    def __mul__(self, other):
        # batch * src: a free product, e.g. to flatten tokens for a projection.
        if isinstance(other, (Dim, DataDim)):
            return DataDim(f"{self.name}*{other.name}")
        return NotImplemented

    __rmul__ = __mul__


def name_of(dim: object) -> str:
    """The name of a dim given as Dim, DataDim, name or literal size."""
    if isinstance(dim, (Dim, DataDim)):
        return dim.name
    if isinstance(dim, str):
        return dim
    if isinstance(dim, int) and not isinstance(dim, bool):
        return str(dim)
    raise TypeError(f"not a dim: {dim!r}")


def factors(name: str) -> tuple[str, ...]:
    """``"heads*d_head"`` -> ``("heads", "d_head")``; ``"1"`` -> ``()``."""
    if name == "1":
        return ()
    return tuple(name.split("*"))


def size_of(name: str, sizes: dict) -> int | None:
    """Size of a (possibly composite) dim name, or None when any part is free."""
    total = 1
    for part in factors(name):
        if part.isdigit():
            total *= int(part)
            continue
        size = sizes.get(part)
        if size is None:
            return None
        total *= size
    return total


def describe(name: str, sizes: dict) -> str:
    """``d_head (64)`` or ``tgt (free)``: a dim for a human."""
    size = size_of(name, sizes)
    if name == "1":
        return "1"
    return f"{name} ({'free' if size is None else size})"


def describe_shape(shape: tuple, sizes: dict) -> str:
    """``(batch, tgt, d_model=512)``: a shape for a human."""
    parts = []
    for name in shape:
        size = size_of(name, sizes)
        parts.append(name if size is None or name == "1" else f"{name}={size}")
    return "(" + ", ".join(parts) + ")"


"""What the executor walks: the graph's steps in order, when each value can be freed, and
the plan a run follows, which

* from 64 tokens, stacks the projections of one input (Q, K and V of a self-attention;
  every layer's cross-attention K and V of the memory) into one product with the weights
  side by side, then a slice for each: one large GEMM runs nearer BLAS's peak than
  several;
* in a plain run (no capture, nothing given or left out), lets a kernel write its result
  into an input read there for the last time (the residual add, ReLU, the mask, softmax,
  the norm) instead of allocating a new array.

Writing in place changes no number: an in-place ufunc computes what the allocating one
does. A stacked product may differ from separate ones in the last bits (BLAS blocks a
taller matrix otherwise), so whether a run stacks depends on its size alone, never on
what it keeps or what ran before (tests compare bit for bit across plans, histories and
``capture``).

A step is ``(node, op, args, attrs, param names, named shape, kernel, call, source)``.
"""

import weakref

import networkx as nx

from ..ir.dims import size_of
from ..ir.errors import ExecutionError
from ..ir.graph import arg_nodes, check_well_formed, execution_order
from ..ir.ops import spec

__all__ = ["Stack", "fast_plan", "frees", "steps"]

_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

STACKED = "+stacked"  # suffix of a stacked projection's step (no traced path holds "+")


def steps(g: nx.MultiDiGraph) -> list[tuple]:
    """One step per node in execution order, cached per graph."""
    plan = _STEPS.get(g)
    if plan is None:
        from . import kernels  # noqa: F401 - attaches the kernels to the registry
        check_well_formed(g)
        plan = []
        for node in execution_order(g):
            d = g.nodes[node]
            if spec(d["op"]).kernel is None:
                raise ExecutionError(f"node {node}: no kernel for op {d['op']!r}")
            kernel, call = spec(d["op"]).kernel[:2]
            plan.append((node, d["op"], arg_nodes(g, node), d["attrs"], tuple(d["params"]),
                         d["shape"], kernel, call, d.get("source", "?")))
        _STEPS[g] = plan
    return plan


def _last_uses(plan: list) -> dict:
    last = {}
    for i, step in enumerate(plan):
        for u in step[2]:
            last[u] = i
    return last


def frees(g: nx.MultiDiGraph, plan: list) -> list[tuple]:
    """For each step of ``plan``, the values read there for the last time (outputs kept):
    freed right after it, so a forward holds only what is still to be read."""
    keep = set(g.graph["outputs"])
    out = [[] for _ in plan]
    for u, i in _last_uses(plan).items():
        if u not in keep:
            out[i].append(u)
    return [tuple(f) for f in out]


class Stack:
    """A stacked projection: ``node`` computes the products of ``members`` (node, lo, hi) at
    once, each member being its columns ``lo:hi``. ``params``: the names stacked (weight, and
    bias if the members have one). ``rows``: the named dims of the input's tokens."""

    def __init__(self, node: str, members: list[tuple[str, int, int]], params: tuple, rows: tuple):
        self.node, self.members, self.params, self.rows = node, members, params, rows


def fast_plan(g: nx.MultiDiGraph, stacked: bool, in_place: bool = True) -> tuple[list, list, list]:
    """Steps with the projections of one input stacked (or not), kernels writing into inputs
    read for the last time (or not: a run keeping every value), their frees and the stacks."""
    cache = _FAST.setdefault(g, {})
    key = (stacked, in_place)
    if key not in cache:
        plan, stacks = _stack_projections(g, steps(g)) if stacked else (list(steps(g)), [])
        if in_place:
            plan = _write_in_place(g, plan)
        cache[key] = (plan, frees(g, plan), stacks)
    return cache[key]


def _stack_projections(g: nx.MultiDiGraph, plan: list) -> tuple[list, list]:
    groups: dict = {}
    for i, (node, op, args, attrs, pnames, names, *_rest) in enumerate(plan):
        shape = g.nodes[node]["params"].get("weight")
        if op == "linear" and len(args) == 1 and shape is not None and len(shape) == 2 and "tied_to" not in attrs:
            groups.setdefault((args[0], shape[1], pnames), []).append(i)
    dims = g.graph["dims"]
    replace, stacks = {}, []
    for (source, _, pnames), members in groups.items():
        rows = [size_of(g.nodes[plan[i][0]]["params"]["weight"][0], dims) for i in members]
        name = plan[members[0]][0] + STACKED
        if len(members) < 2 or None in rows or name in g:
            continue
        first = plan[members[0]]
        parts, lo = [], 0
        for i, n in zip(members, rows):
            node, _, args, _, _, names, *_, src = plan[i]
            parts.append((node, "slice", (name,), {"axis": len(names) - 1, "start": lo, "stop": lo + n}, (),
                          names, None, spec("slice").kernel.call, src))
            lo += n
        replace[members[0]] = [(name, "linear", first[2], {}, pnames, None) + first[6:]] + parts
        replace.update({i: [] for i in members[1:]})
        stacks.append(Stack(name, [(p[0], p[3]["start"], p[3]["stop"]) for p in parts], pnames,
                            tuple(g.nodes[source]["shape"][:-1])))
    return [s for i, step in enumerate(plan) for s in replace.get(i, [step])], stacks


def _write_in_place(g: nx.MultiDiGraph, plan: list) -> list:
    """Steps whose kernel may write into an input: the input is its own buffer (made by a
    kernel that always returns a new array), is read here for the last time, is not an
    output, and no value that may be a view of it is read later."""
    last = _last_uses(plan)
    outputs = set(g.graph["outputs"])
    bases: dict = {}  # value -> the fresh values whose buffer it may share
    views: dict = {}  # fresh value -> the other values that may share its buffer
    out = []
    for i, step in enumerate(plan):
        node, op, args = step[:3]
        kernel = spec(op).kernel
        if kernel.fresh:
            bases[node] = (node,)
        else:  # its result may be (a view of) any of its inputs
            bases[node] = tuple({b for u in args for b in bases.get(u, ())})
            for b in bases[node]:
                views.setdefault(b, []).append(node)
        target = next((j for j in kernel.in_place if j < len(args) and _donatable(
            args[j], i, args, bases, views, last, outputs)), None)
        if target is not None:
            step = step[:7] + ((lambda fn, ins, a, p, s, call=kernel.call, j=target: call(
                fn, ins, a, p, s, out=ins[j])),) + step[8:]
        out.append(step)
    return out


def _donatable(u: str, i: int, args: tuple, bases: dict, views: dict, last: dict, outputs: set) -> bool:
    if bases.get(u) != (u,) or u in outputs or last[u] != i or args.count(u) != 1:
        return False
    return all(last.get(v, -1) < i and v not in outputs and v not in args for v in views.get(u, ()))

"""The op registry: one entry per op, and every stage covers every op.

Adding an op is one entry in ``qkvflow.ir.ops.OPS`` plus its kernel and
flow transfer; these tests fail until each stage has it.
"""

import networkx as nx
import pytest

import qkvflow as qf
from qkvflow.ir.errors import ExecutionError, GraphError
from qkvflow.ir.graph import lint
from qkvflow.ir.ops import INITS, OPS, Group, OpSpec, implement, spec
from qkvflow.passes import flow
from qkvflow.run import kernels  # noqa: F401 - attaches the kernels
from qkvflow.views.render import STYLES, render


@pytest.mark.parametrize("op", OPS)
def test_every_stage_covers_every_op(op):
    entry = spec(op)
    assert isinstance(entry, OpSpec) and entry.name == op
    assert entry.doc and entry.groups, op
    assert callable(entry.shape), f"{op}: no shape rule"
    assert entry.style in STYLES, f"{op}: style {entry.style!r} has no drawing"
    assert entry.kernel is not None, f"{op}: no kernel"
    assert callable(entry.transfer), f"{op}: no information-flow transfer"
    assert set(entry.init.values()) <= set(INITS), op
    if op != "input":
        assert callable(entry.kernel.call), op


def test_every_parameter_an_op_can_own_has_an_initialiser():
    g = qf.trace(qf.load_model("tiny"))
    learned = qf.trace(qf.transformer.build(qf.models.config.from_dict(
        {"preset": "tiny", "positions": "learned", "shared_embeddings": False, "tied_embeddings": False})))
    for graph in (g, learned):
        for node, data in graph.nodes(data=True):
            assert set(data["params"]) <= set(spec(data["op"]).init), node
            if data["params"]:
                assert Group.PARAMETRISED in spec(data["op"]).groups, node


def test_groups_are_what_passes_ask():
    contractions = {op for op, s in OPS.items() if Group.CONTRACTION in s.groups}
    assert contractions == {"scores", "attend", "matmul", "einsum"}
    assert {op for op, s in OPS.items() if Group.MASK in s.groups} == {"padding_mask", "causal_mask"}


def test_an_op_is_implemented_once_and_only_if_known():
    with pytest.raises(ValueError, match="already has a kernel"):
        implement("kernel", "linear")(object())
    with pytest.raises(KeyError):
        implement("transfer", "conv2d")(object())


def test_every_stage_refuses_an_unknown_op_loudly():
    with pytest.raises(GraphError, match="unknown op 'conv2d'; known ops: input, embed"):
        spec("conv2d")
    g = qf.trace(qf.load_model("tiny"))
    bad = g.copy()
    bad.nodes["decoder.unembed"]["op"] = "conv2d"
    assert ("decoder.unembed", "node decoder.unembed has unknown op 'conv2d'") in lint(bad)
    assert [d.code for d in qf.check(bad)] == ["QKV001"]
    with pytest.raises(GraphError, match="conv2d"):
        flow.analyse(bad)
    with pytest.raises((GraphError, ExecutionError), match="conv2d"):
        qf.Executor(bad, qf.init_params(g))
    with pytest.raises(qf.QkvflowError, match="conv2d"):
        render(bad, fmt="mmd")


def test_a_stage_without_code_for_an_op_says_so():
    entry = spec("concat")
    saved = entry.transfer
    entry.transfer = None
    try:
        g = nx.MultiDiGraph(sequences={})
        g.add_node("x", op="input", shape=("n",), attrs={"name": "x", "shape": ("n",)})
        g.add_node("c", op="concat", shape=("n",), attrs={"axis": 0})
        g.add_edge("x", "c", role="x", arg=0)
        with pytest.raises(GraphError, match="no information-flow rule for op 'concat'"):
            flow.analyse(g)
    finally:
        entry.transfer = saved


def test_attribute_choices_are_what_the_kernels_run():
    import numpy as np
    assert set(spec("elementwise").choices["fn"]) == set(kernels._ELEMENTWISE)
    assert set(spec("reduce").choices["fn"]) == set(kernels._REDUCE)
    x = np.linspace(-2.0, 2.0, 5)
    for fn in spec("activation").choices["fn"]:
        assert kernels.activation(x, fn).shape == (5,)
    for kind in spec("norm").choices["kind"]:
        assert kernels.norm(x[None], np.ones(5), np.zeros(5), kind, 1e-5).shape == (1, 5)
    for kind in spec("positional").choices["kind"]:
        table = np.zeros((9, 5)) if kind == "learned" else None
        attrs = {"kind": kind, "offset": 0}
        out = spec("positional").kernel.call(kernels.positional, [np.zeros((1, 4, 5))], attrs,
                                             {"weight": table} if table is not None else {}, {})
        assert out.shape == (1, 4, 5)


def test_an_attribute_value_no_kernel_runs_is_qkv104_at_its_node():
    g = qf.trace(qf.load_model("tiny"))
    g.nodes["encoder.layers.0.relu"]["attrs"]["fn"] = "swish"
    found = [d for d in qf.check(g) if d.code == "QKV104"]
    assert [(d.node, d.message) for d in found] == [(
        "encoder.layers.0.relu",
        "activation encoder.layers.0.relu has fn = 'swish', which qkvflow does not run; "
        "use one of relu, gelu, gelu_tanh, silu")]

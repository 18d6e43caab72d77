"""Every kernel against a value worked out by hand on a small input.

The kernels are the definition of each op (the executor only calls them), so
each one is pinned here by numbers written literally, with the arithmetic in
a comment beside them. Sizes differ on every axis so that a transposed
result cannot pass.
"""

import math

import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from qkvflow.run import kernels
from qkvflow.ir.ops import spec
from qkvflow.run.kernels import sinusoidal_table

NEG = -np.inf


def via_table(op, inputs, attrs=None, params=None, sizes=None):
    """Call a kernel the way the executor does: through its registry entry's adapter. An op
    that may write into an input is also called so, on copies, for each such input: every
    hand-checked value below holds for both, bit for bit."""
    k = spec(op).kernel
    attrs, params, sizes = attrs or {}, params or {}, sizes or {}
    out = k.call(k.fn, inputs, attrs, params, sizes)
    for j in k.in_place:
        if j < len(inputs):
            copies = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in inputs]
            written = k.call(k.fn, copies, attrs, params, sizes, out=copies[j])
            np.testing.assert_array_equal(written, out, strict=True)
            # writing in place never changes a layout (the strides of axes of one entry are moot)
            assert [st for n, st in zip(out.shape, written.strides) if n > 1] == \
                [st for n, st in zip(out.shape, out.strides) if n > 1]
    return out


# --- softmax -----------------------------------------------------------------

def test_softmax_of_log_1_2_3_is_one_sixth_one_third_one_half():
    # exp(ln 1), exp(ln 2), exp(ln 3) = 1, 2, 3; their sum is 6 -> 1/6, 2/6, 3/6
    x = np.array([[0.0, 0.6931471805599453, 1.0986122886681098]])
    got = kernels.softmax(x, -1)
    np.testing.assert_allclose(got, [[1 / 6, 1 / 3, 1 / 2]], rtol=0, atol=1e-15)


def test_softmax_large_logits_do_not_overflow():
    # 1000 and 1000 + ln 3: shifted by the max they are -ln 3 and 0 -> 1/(1+3), 3/(1+3)
    x = np.array([1000.0, 1000.0 + 1.0986122886681098])
    np.testing.assert_allclose(kernels.softmax(x, -1), [0.25, 0.75], rtol=0, atol=1e-12)


def test_softmax_partially_masked_row_ignores_the_masked_key():
    # [ln 1, -inf, ln 3] -> exp gives [1, 0, 3], sum 4 -> [1/4, 0, 3/4]
    x = np.array([[0.0, NEG, 1.0986122886681098]])
    got = kernels.softmax(x, -1)
    np.testing.assert_allclose(got, [[0.25, 0.0, 0.75]], rtol=0, atol=1e-15)
    assert got[0, 1] == 0.0


def test_softmax_fully_masked_row_gives_zeros_not_nan():
    # row 0: all keys masked -> defined as zeros; row 1: [0, 0, 0] -> 1/3 each
    x = np.array([[NEG, NEG, NEG], [0.0, 0.0, 0.0]])
    with np.errstate(all="raise"):  # no invalid-value warning hidden inside either
        got = kernels.softmax(x, -1)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(got[1], [1 / 3, 1 / 3, 1 / 3], rtol=0, atol=1e-16)


def test_softmax_axis_is_respected():
    # columns [0, ln 3] -> [1/4, 3/4] each when taken over axis 0
    x = np.array([[0.0, 0.0], [1.0986122886681098, 1.0986122886681098]])
    np.testing.assert_allclose(kernels.softmax(x, 0), [[0.25, 0.25], [0.75, 0.75]], atol=1e-15)
    np.testing.assert_allclose(kernels.softmax(x, 1), [[0.5, 0.5], [0.5, 0.5]], atol=1e-15)


def test_softmax_keeps_float32():
    x = np.array([[0.0, NEG, 0.0]], dtype=np.float32)
    got = via_table("softmax", [x], {"axis": -1})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([[0.5, 0.0, 0.5]], dtype=np.float32))


# --- mask, scores, attend --------------------------------------------------------

def test_mask_puts_minus_inf_where_keep_is_false_and_broadcasts_over_queries():
    scores = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (tq=2, tk=3)
    keep = np.array([[True, False, True]])                  # (1, tk): one key masked for all queries
    got = via_table("mask", [scores, keep])
    np.testing.assert_array_equal(got, [[1.0, NEG, 3.0], [4.0, NEG, 6.0]])
    assert got.dtype == scores.dtype


def test_scores_is_q_dot_k_times_scale():
    q = np.array([[1.0, 0.0, 2.0],                     # (tq=2, d=3)
                  [0.0, 1.0, 0.0]])
    k = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0],   # (tk=4, d=3)
                  [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    # q0.k = [1+0+2, 2+0+0, 0+0+6, 1+0+0] = [3, 2, 6, 1]; q1.k = [1, 0, 0, -1]; times 0.5
    want = [[1.5, 1.0, 3.0, 0.5], [0.5, 0.0, 0.0, -0.5]]
    np.testing.assert_array_equal(kernels.scores(q, k, 0.5), want)
    np.testing.assert_array_equal(via_table("scores", [q, k], {"scale": 0.5}), want)
    # scale 1 leaves the plain dot products
    np.testing.assert_array_equal(kernels.scores(q, k, 1.0), [[3, 2, 6, 1], [1, 0, 0, -1]])


def test_scores_batched_over_heads():
    q = np.zeros((2, 3, 1, 5))  # (batch, heads, tq, d)
    k = np.zeros((2, 3, 4, 5))  # (batch, heads, tk, d)
    q[1, 2, 0, 4] = 2.0
    k[1, 2, 3, 4] = 3.0
    got = kernels.scores(q, k, 0.25)
    assert got.shape == (2, 3, 1, 4)
    # only batch 1, head 2, key 3 has a non-zero product: 2 * 3 * 0.25 = 1.5
    assert got[1, 2, 0, 3] == 1.5
    assert np.count_nonzero(got) == 1


def test_attend_is_the_probability_weighted_sum_of_values():
    p = np.array([[0.5, 0.5, 0.0],        # (tq=2, tk=3)
                  [0.0, 0.25, 0.75]])
    v = np.array([[2.0, 4.0], [6.0, 8.0], [4.0, 0.0]])  # (tk=3, d=2)
    # row 0: 0.5*[2,4] + 0.5*[6,8] = [4, 6]; row 1: 0.25*[6,8] + 0.75*[4,0] = [4.5, 2]
    want = [[4.0, 6.0], [4.5, 2.0]]
    np.testing.assert_array_equal(kernels.attend(p, v), want)
    np.testing.assert_array_equal(via_table("attend", [p, v]), want)


# --- heads ---------------------------------------------------------------------------

def test_split_heads_exact_layout():
    # (batch=1, seq=2, heads*d_head=3*2): element [s, h*2 + d] goes to [h, s, d]
    x = np.arange(12.0).reshape(1, 2, 6)  # row 0 = 0..5, row 1 = 6..11
    got = kernels.split_heads(x, 3)
    assert got.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(got[0, 0], [[0, 1], [6, 7]])
    np.testing.assert_array_equal(got[0, 1], [[2, 3], [8, 9]])
    np.testing.assert_array_equal(got[0, 2], [[4, 5], [10, 11]])
    np.testing.assert_array_equal(via_table("split_heads", [x], {"heads": "heads"}, sizes={"heads": 3}), got)


def test_merge_heads_exact_layout_and_round_trip():
    # (batch=1, heads=3, seq=2, d_head=2) with value 100*h + 10*s + d
    x = np.array([[[[100 * h + 10 * s + d for d in range(2)] for s in range(2)] for h in range(3)]], float)
    got = kernels.merge_heads(x)
    assert got.shape == (1, 2, 6)
    # position s lists head 0's d_head values, then head 1's, then head 2's
    np.testing.assert_array_equal(got[0, 0], [0, 1, 100, 101, 200, 201])
    np.testing.assert_array_equal(got[0, 1], [10, 11, 110, 111, 210, 211])
    np.testing.assert_array_equal(kernels.split_heads(got, 3), x)
    y = np.random.default_rng(0).normal(size=(2, 5, 21))  # (batch, tgt, heads*d_head = 3*7)
    np.testing.assert_array_equal(kernels.merge_heads(kernels.split_heads(y, 3)), y)
    np.testing.assert_array_equal(via_table("merge_heads", [kernels.split_heads(y, 3)]), y)


# --- norms -------------------------------------------------------------------------------

def test_layer_norm_by_hand():
    x = np.array([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    # mean 40/8 = 5; deviations [-3,-1,-1,-1,0,0,2,4]; variance (9+1+1+1+0+0+4+16)/8 = 4
    # eps 5: sqrt(4 + 5) = 3 -> [-1, -1/3, -1/3, -1/3, 0, 0, 2/3, 4/3]; * 3 + 1:
    want = [-2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 3.0, 5.0]
    got = kernels.layer_norm(x, np.full(8, 3.0), np.full(8, 1.0), 5.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    # eps 0, weight 1, no bias: sqrt(4) = 2 -> deviations / 2
    got = kernels.layer_norm(x, np.ones(8), None, 0.0)
    np.testing.assert_array_equal(got, [-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0])


def test_layer_norm_through_the_table_uses_bias_and_weight_per_feature():
    x = np.array([[1.0, 3.0]])  # mean 2, variance 1, eps 0 -> [-1, 1]
    got = via_table("norm", [x], {"kind": "layer", "eps": 0.0},
                    {"weight": np.array([2.0, 5.0]), "bias": np.array([10.0, 20.0])})
    # [-1*2 + 10, 1*5 + 20]
    np.testing.assert_array_equal(got, [[8.0, 25.0]])


def test_rms_norm_by_hand_no_mean_subtraction():
    x = np.array([3.0, 4.0])
    # mean square (9 + 16) / 2 = 12.5; + eps 3.5 = 16; sqrt = 4 -> [0.75, 1]; times weight [2, -1]
    got = kernels.rms_norm(x, np.array([2.0, -1.0]), 3.5)
    np.testing.assert_array_equal(got, [1.5, -1.0])
    # through the table (kind rms ignores a bias): [1, 7, 1, 7] -> mean square 100/4 = 25 -> / 5
    got = via_table("norm", [np.array([1.0, 7.0, 1.0, 7.0])], {"kind": "rms", "eps": 0.0},
                    {"weight": np.ones(4)})
    np.testing.assert_allclose(got, [0.2, 1.4, 0.2, 1.4], rtol=0, atol=1e-15)


# --- activations -----------------------------------------------------------------------------

X = np.array([0.0, 1.0, -1.0])


@pytest.mark.parametrize("fn, want", [
    # max(x, 0)
    ("relu", [0.0, 1.0, 0.0]),
    # x * Phi(x): Phi(1) = 0.8413447460685429; gelu(-1) = -Phi(-1) = -(1 - 0.8413447460685429)
    ("gelu", [0.0, 0.8413447460685429, -0.15865525393145707]),
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): sqrt(2/pi) = 0.7978845608028654,
    # * 1.044715 = 0.8335619689391656, tanh = 0.6823839812165535 -> 0.5 * 1.6823839812165535;
    # at -1 the tanh is odd: -0.5 * (1 - 0.6823839812165535)
    ("gelu_tanh", [0.0, 0.8411919906082768, -0.15880800939172324]),
    # x / (1 + e^-x): 1 / (1 + 0.36787944117144233) = 0.7310585786300049; -1 / (1 + e)
    ("silu", [0.0, 0.7310585786300049, -0.2689414213699951]),
])
def test_activations_at_zero_one_minus_one(fn, want):
    np.testing.assert_allclose(kernels.activation(X, fn), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(via_table("activation", [X], {"fn": fn}), want, rtol=0, atol=1e-15)


def test_gelu_erf_and_tanh_are_different_functions():
    # they differ by about 3e-4 at x = 1: an erf/tanh mix-up must not pass
    diff = kernels.activation(X, "gelu")[1] - kernels.activation(X, "gelu_tanh")[1]
    assert diff == pytest.approx(0.8413447460685429 - 0.8411919906082768, abs=1e-15)


def test_activation_keeps_float32_and_rejects_unknown():
    x32 = X.astype(np.float32)
    for fn in ("relu", "gelu", "gelu_tanh", "silu"):
        assert kernels.activation(x32, fn).dtype == np.float32, fn
    with pytest.raises(ValueError, match="swish"):
        kernels.activation(X, "swish")


# --- positions ------------------------------------------------------------------------------------

def test_sinusoidal_interleaved_positions_0_and_1():
    # d = 4: frequencies 10000^(-2i/4) for i = 0, 1 -> 1 and 0.01
    # PE[p, 2i] = sin(p * f_i), PE[p, 2i+1] = cos(p * f_i)
    table = sinusoidal_table(2, 4, "sinusoidal", np.float64)
    np.testing.assert_array_equal(table[0], [0.0, 1.0, 0.0, 1.0])
    # sin 1, cos 1, sin 0.01, cos 0.01
    want = [0.8414709848078965, 0.5403023058681398, 0.009999833334166664, 0.9999500004166653]
    np.testing.assert_allclose(table[1], want, rtol=0, atol=1e-16)


def test_sinusoidal_half_positions_0_and_1():
    # Marian layout: sin of every frequency first, then cos of every frequency
    table = sinusoidal_table(2, 4, "sinusoidal_half", np.float64)
    np.testing.assert_array_equal(table[0], [0.0, 0.0, 1.0, 1.0])
    want = [0.8414709848078965, 0.009999833334166664, 0.5403023058681398, 0.9999500004166653]
    np.testing.assert_allclose(table[1], want, rtol=0, atol=1e-16)


def test_sinusoidal_table_dtype_and_size():
    table = sinusoidal_table(11, 6, "sinusoidal", np.float32)
    assert table.shape == (11, 6) and table.dtype == np.float32


def test_sinusoidal_interleaved_odd_width_follows_the_formula():
    # d = 5: frequencies 10000^(-2i/5) for i = 0, 1, 2 -> 1, 10000^-0.4 = 0.025118864315095794,
    # 10000^-0.8 = 0.000630957344480193; column 4 = 2*2 is sin(p * 10000^-0.8)
    table = sinusoidal_table(2, 5, "sinusoidal", np.float64)
    want = [0.8414709848078965, 0.5403023058681398,        # sin 1, cos 1
            0.025116222909773774, 0.9996845379152098,      # sin, cos of 0.025118864315095794
            0.0006309573026154199]                         # sin 0.000630957344480193
    np.testing.assert_allclose(table[1], want, rtol=0, atol=1e-16)


def test_positional_adds_the_table_from_the_offset():
    x = np.zeros((1, 1, 4))  # one position, d = 4
    # offset 1: the row of position 1 is added (sin 1, cos 1, sin 0.01, cos 0.01)
    got = via_table("positional", [x + 1.0], {"kind": "sinusoidal", "offset": 1})
    want = 1.0 + np.array([0.8414709848078965, 0.5403023058681398, 0.009999833334166664,
                           0.9999500004166653])
    np.testing.assert_allclose(got[0, 0], want, rtol=0, atol=1e-15)
    # learned positions: rows 2 and 3 of the weight for offset 2, two positions
    weight = np.arange(20.0).reshape(5, 4)  # (max_positions=5, d=4)
    got = via_table("positional", [np.zeros((1, 2, 4))], {"kind": "learned", "offset": 2},
                    {"weight": weight})
    np.testing.assert_array_equal(got[0], [[8, 9, 10, 11], [12, 13, 14, 15]])


def test_sinusoidal_rows_are_built_once_and_the_kept_table_cannot_be_written():
    """A run's sinusoidal rows are kept for the next run of that size (read-only, so no run can
    change another's), and a feature-major value of 70 tokens adds the same rows."""
    x = np.random.default_rng(3).standard_normal((5, 14, 6))  # 70 tokens, d 6
    attrs = {"kind": "sinusoidal", "offset": 2}
    want = x + kernels.sinusoidal_table(16, 6, "sinusoidal", np.float64)[2:]
    first = via_table("positional", [x], attrs)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(via_table("positional", [feature_major(x)], attrs), want)
    table = kernels._table(16, 6, "sinusoidal", x.dtype.str, 2)
    assert table is kernels._table(16, 6, "sinusoidal", x.dtype.str, 2)
    with pytest.raises(ValueError, match="read-only"):
        table[0, 0] = 1.0


def test_positional_beyond_the_table_is_an_error():
    with pytest.raises(ValueError, match="position 5 is beyond the table of 5 positions"):
        kernels.positional(np.zeros((1, 3, 4)), np.zeros((5, 4)), 3)


# --- masks ---------------------------------------------------------------------------------------

def test_padding_mask_is_true_on_real_tokens():
    ids = np.array([[5, 3, 0, 0], [7, 0, 9, 1]])
    np.testing.assert_array_equal(kernels.padding_mask(ids, 0),
                                  [[True, True, False, False], [True, False, True, True]])
    np.testing.assert_array_equal(via_table("padding_mask", [ids], {"pad_id": 3}),
                                  [[True, False, True, True], [True, True, True, True]])


def test_causal_mask_keeps_keys_up_to_the_query():
    ids = np.array([[4, 5, 6], [7, 8, 0]])  # (batch=2, tgt=3) -> (tgt, tgt)
    want = [[True, False, False],
            [True, True, False],
            [True, True, True]]
    np.testing.assert_array_equal(kernels.causal_mask(ids), want)
    np.testing.assert_array_equal(via_table("causal_mask", [ids]), want)


# --- embed, linear, unembed ------------------------------------------------------------------------

def test_embed_looks_up_rows_and_scales():
    weight = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])  # (vocab=3, d=2)
    ids = np.array([[2, 1, 2]])
    # rows 2, 1, 2 times 2
    want = [[[6.0, -2.0], [2.0, 4.0], [6.0, -2.0]]]
    np.testing.assert_array_equal(kernels.embed(ids, weight, 2.0), want)
    np.testing.assert_array_equal(via_table("embed", [ids], {"scale": 2.0}, {"weight": weight}), want)
    np.testing.assert_array_equal(kernels.embed(ids, weight, 1.0), [[[3, -1], [1, 2], [3, -1]]])


def test_linear_is_x_times_weight_transposed_plus_bias():
    x = np.array([[1.0, 2.0, 3.0]])             # (1, d_in=3)
    w = np.array([[1.0, 0.0, -1.0],            # (d_out=2, d_in=3)
                  [2.0, 1.0, 0.0]])
    b = np.array([10.0, 20.0])
    # [1 - 3 + 10, 2 + 2 + 20]
    np.testing.assert_array_equal(kernels.linear(x, w, b), [[8.0, 24.0]])
    np.testing.assert_array_equal(via_table("linear", [x], {}, {"weight": w, "bias": b}), [[8.0, 24.0]])
    np.testing.assert_array_equal(via_table("linear", [x], {}, {"weight": w}), [[-2.0, 4.0]])


def test_unembed_is_x_times_weight_transposed():
    x = np.array([[1.0, -1.0]])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])  # (vocab=3, d=2)
    # [1, -1, 2 - 3]
    np.testing.assert_array_equal(via_table("unembed", [x], {}, {"weight": w}), [[1.0, -1.0, -1.0]])


@pytest.mark.parametrize("w_dtype, x_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                              (np.float32, np.float64)])
@pytest.mark.parametrize("op", ["linear", "unembed"])
def test_a_few_tokens_times_a_weight_larger_than_a_block(op, w_dtype, x_dtype):
    # A weight of more rows than one block of kernels._WEIGHT_BLOCK bytes holds (a float32
    # product of a few tokens runs block by block), and not a whole number of blocks; the
    # result in the dtype NumPy's product of the two gives, whatever the path.
    rows = kernels._WEIGHT_BLOCK // (2 * np.dtype(w_dtype).itemsize) * 3 // 2
    w = np.stack([np.arange(rows), -np.ones(rows)], axis=1).astype(w_dtype)  # row r: [r, -1]
    x = np.array([[[1.0, 10.0], [2.0, 0.0], [0.0, 1.0]]], x_dtype)  # (batch=1, tokens=3, d=2)
    r = np.arange(rows, dtype=x_dtype)
    want = np.stack([r - 10, 2 * r, -np.ones(rows, x_dtype)])[None]  # x[t, 0] * r - x[t, 1]
    got = via_table(op, [x], {}, {"weight": w})
    assert got.dtype == x_dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    one = via_table(op, [x[:, :1]], {}, {"weight": w})  # one token
    assert one.dtype == x_dtype
    np.testing.assert_array_equal(one, want[:, :1])


# --- NumPy-level ops through the table ---------------------------------------------------------------

def test_numpy_level_ops_through_the_table():
    x = np.array([[1.0, 4.0], [9.0, 16.0]])
    # 10 - x with the constant first
    np.testing.assert_array_equal(
        via_table("elementwise", [x], {"fn": "sub", "const": 10.0, "const_first": True}),
        [[9.0, 6.0], [1.0, -6.0]])
    np.testing.assert_array_equal(via_table("elementwise", [x], {"fn": "sqrt"}), [[1, 2], [3, 4]])
    cond = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(via_table("where", [cond, x], {"b": -1.0}), [[1.0, -1.0], [-1.0, 16.0]])
    # sums over the last axis: 1 + 4, 9 + 16
    np.testing.assert_array_equal(via_table("reduce", [x], {"fn": "sum", "axis": (1,), "keepdims": True}),
                                  [[5.0], [25.0]])
    np.testing.assert_array_equal(via_table("transpose", [x], {"perm": (1, 0)}), [[1, 9], [4, 16]])
    # (2, 3) -> (heads=3, d_head=2): the same six numbers, row-major
    np.testing.assert_array_equal(
        via_table("reshape", [np.arange(6.0).reshape(2, 3)], {"shape": ("heads", "d_head")},
                  sizes={"heads": 3, "d_head": 2}),
        [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(via_table("einsum", [x, x], {"equation": "ij,jk->ik"}), x @ x)
    np.testing.assert_array_equal(via_table("concat", [x, x], {"axis": -1}).shape, (2, 4))


# --- the annotations are checks, not decoration ----------------------------------------------------------

def test_checked_scores_rejects_mismatched_head_dims():
    checked = jaxtyped(typechecker=beartype)(kernels.scores)
    q, k = np.zeros((2, 3, 5, 7)), np.zeros((2, 3, 11, 7))  # (batch, heads, tgt, d_head), (.., src, ..)
    assert checked(q, k, 0.5).shape == (2, 3, 5, 11)
    with pytest.raises(TypeCheckError):
        checked(q, np.zeros((2, 3, 11, 5)), 0.5)  # d_head 7 against 5


def test_checked_attend_rejects_key_length_mismatch():
    checked = jaxtyped(typechecker=beartype)(kernels.attend)
    with pytest.raises(TypeCheckError):
        checked(np.zeros((3, 5, 11)), np.zeros((3, 5, 7)))  # keys 11 vs values over 5


def test_scale_is_applied_in_the_input_dtype():
    q = np.ones((1, 2), dtype=np.float32)
    s = kernels.scores(q, q, 1.0 / math.sqrt(7.0))
    assert s.dtype == np.float32
    assert s[0, 0] == np.float32(2.0) * np.float32(1.0 / math.sqrt(7.0))


# --- layouts: from 64 tokens values are held feature by feature ---------------------------------------

def feature_major(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` (..., d) laid out feature by feature, as the executor holds values of
    64 tokens or more: each feature's values over all the tokens contiguous."""
    out = np.empty((a.shape[-1], a.size // a.shape[-1]), a.dtype).T.reshape(a.shape)
    out[...] = a
    return out


def test_every_kernel_gives_the_same_numbers_from_either_layout():
    """The same inputs, token-major and feature-major (70 tokens, d 12, 3 heads of 4): the
    same numbers, to the last bits BLAS and sums over a strided axis may order otherwise."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 14, 12))                    # (batch, seq, d)
    xf = feature_major(x)
    w, b = rng.standard_normal((9, 12)), rng.standard_normal(9)
    gain, shift = rng.standard_normal(12), rng.standard_normal(12)
    close = dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(via_table("linear", [xf], {}, {"weight": w, "bias": b}),
                               x @ w.T + b, **close)
    np.testing.assert_allclose(via_table("unembed", [xf], {}, {"weight": w}), x @ w.T, **close)
    assert via_table("unembed", [xf], {}, {"weight": w}).flags.c_contiguous  # logits token by token
    for kind in ("layer", "rms"):
        params = {"weight": gain, "bias": shift} if kind == "layer" else {"weight": gain}
        np.testing.assert_allclose(via_table("norm", [xf], {"kind": kind, "eps": 1e-5}, params),
                                   via_table("norm", [x], {"kind": kind, "eps": 1e-5}, params), **close)
    np.testing.assert_allclose(via_table("softmax", [xf], {"axis": -1}), via_table("softmax", [x], {"axis": -1}),
                               **close)
    for other in (feature_major(x[::-1]), np.ascontiguousarray(x[::-1]), shift):
        np.testing.assert_array_equal(via_table("add", [xf, other]), x + other)
    np.testing.assert_array_equal(via_table("activation", [xf], {"fn": "relu"}), np.maximum(x, 0))
    table = rng.standard_normal((20, 12))
    np.testing.assert_array_equal(via_table("positional", [xf], {"offset": 3, "kind": "learned"}, {"weight": table}),
                                  x + table[3:17])
    q = via_table("split_heads", [xf], {"heads": "heads"}, sizes={"heads": 3})  # views, strided
    assert not q.flags.c_contiguous and q.shape == (5, 3, 14, 4)
    s = via_table("scores", [q, q], {"scale": 0.5})
    np.testing.assert_allclose(s, 0.5 * np.einsum("bhqd,bhkd->bhqk", q, q), **close)
    p = via_table("softmax", [s], {"axis": -1})
    o = via_table("attend", [p, q])
    np.testing.assert_allclose(o, np.einsum("bhqk,bhkd->bhqd", p, q), **close)
    merged = via_table("merge_heads", [o])
    np.testing.assert_array_equal(merged, np.swapaxes(o, 1, 2).reshape(5, 14, 12))
    assert merged.reshape(-1, 12).flags.f_contiguous  # 70 tokens: laid out for the output projection


def test_writing_in_place_keeps_the_layout_the_value_would_have_had():
    """A kernel writes into a donated input only when it is laid out as the result would be
    otherwise (so a norm after it sums in the same order, and a run gives the same bits
    whether it writes in place or not); otherwise it allocates and leaves the input alone."""
    rng = np.random.default_rng(1)
    a = feature_major(rng.standard_normal((7, 10, 6)))
    b = np.ascontiguousarray(rng.standard_normal((7, 10, 6)))
    kept = b.copy()
    got = kernels.add(a, b, out=b)  # b is token-major, the result would be feature-major like a
    assert got is not b and got.strides == a.strides
    np.testing.assert_array_equal(b, kept)
    c = a.copy(order="K")
    assert kernels.add(c, b, out=c) is c
    y = kernels.norm(a, np.ones(6), None, "layer", 1e-5)
    assert y.strides == a.strides
    donated = a.copy(order="K")
    assert kernels.norm(donated, np.ones(6), None, "layer", 1e-5, out=donated) is donated
    np.testing.assert_array_equal(donated, y)


def test_an_elementwise_result_keeps_the_float32_of_its_float_operands():
    """An int or float64 operand does not widen float32 (only the run's dtype decides), written
    in place or not."""
    x = np.arange(280, dtype=np.float32).reshape(70, 4)
    for other in (np.arange(280).reshape(70, 4), np.arange(4).reshape(1, 4), np.float64(0.5)):
        got = via_table("elementwise", [x, other], {"fn": "mul"})
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, (x * other).astype(np.float32))

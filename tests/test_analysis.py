"""graphopt.analysis: params, MACs/FLOPs against hand-computed closed forms, bytes, sparsity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from graphopt.analysis import ModelStats, analyze
from graphopt.model import Model, load_model, save_model


def build(text: str, **weights: np.ndarray) -> Model:
    """A Model from ONNX text, with `weights` added as initializers."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(proto)
    return Model(ir=ir.serde.deserialize_model(proto))


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


# ---------------------------------------------------------------------------- MACs


def test_grouped_strided_dilated_conv():
    n, c_in, h, w = 2, 8, 17, 19
    c_out, groups, k, stride, dilation, pad = 16, 4, 3, 2, 2, 1
    model = build(
        f"""{HEADER}
        g (float[{n}, {c_in}, {h}, {w}] x) => (float[a, b, c, d] y) {{
          y = Conv <group={groups}, strides=[{stride}, {stride}], dilations=[{dilation}, {dilation}],
                    pads=[{pad}, {pad}, {pad}, {pad}]> (x, w, b)
        }}""",
        w=randn(c_out, c_in // groups, k, k),
        b=randn(c_out),
    )
    ho = conv_out(h, k, stride, pad, dilation)
    wo = conv_out(w, k, stride, pad, dilation)
    assert (ho, wo) == (8, 9)  # hand-checked: (17+2-5)//2+1, (19+2-5)//2+1
    # every output element: a dot product over (C_in / groups) x k x k
    expected = n * c_out * ho * wo * (c_in // groups) * k * k
    stats = analyze(model)
    assert stats.macs == expected == 41472
    assert stats.flops == 2 * expected
    assert stats.flops_unknown == []
    assert stats.params == c_out * (c_in // groups) * k * k + c_out


@pytest.mark.parametrize(
    ("auto_pad", "stride", "out"), [("NOTSET", 1, 46), ("VALID", 2, 23), ("SAME_UPPER", 3, 17)]
)
def test_depthwise_conv_1d_padding_modes(auto_pad, stride, out):
    model = build(
        f"""{HEADER}
        g (float[1, 6, 50] x) => (float[a, b, c] y) {{
          y = Conv <group=6, kernel_shape=[5], strides=[{stride}], auto_pad="{auto_pad}"> (x, w)
        }}""",
        w=randn(6, 1, 5),
    )
    assert analyze(model).macs == 6 * out * 5


def test_conv_transpose():
    n, c_in, h, w, c_out, groups, k = 1, 4, 5, 6, 6, 2, 3
    model = build(
        f"""{HEADER}
        g (float[{n}, {c_in}, {h}, {w}] x) => (float[a, b, c, d] y) {{
          y = ConvTranspose <group={groups}, strides=[2, 2]> (x, w)
        }}""",
        w=randn(c_in, c_out // groups, k, k),
    )
    # every input element is scattered into (C_out / groups) x k x k outputs
    assert analyze(model).macs == n * c_in * h * w * (c_out // groups) * k * k == 3240


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_transposes(trans_a, trans_b):
    m, k, n = 3, 20, 7
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    model = build(
        f"""{HEADER}
        g (float[{a_shape[0]}, {a_shape[1]}] a) => (float y) {{
          y = Gemm <transA={trans_a}, transB={trans_b}> (a, b, c)
        }}""",
        b=randn(*b_shape),
        c=randn(n),
    )
    stats = analyze(model)
    assert stats.macs == m * k * n == 420
    assert stats.params == k * n + n


def test_batched_broadcast_matmul_of_two_activations():
    model = build(
        f"""{HEADER}
        g (float[2, 1, 4, 5] a, float[3, 5, 6] b) => (float y) {{
          y = MatMul (a, b)
        }}"""
    )
    # batch dims [2, 1] and [3] broadcast to [2, 3]
    assert analyze(model).macs == 2 * 3 * 4 * 5 * 6


def test_matmul_with_vectors():
    model = build(
        f"""{HEADER}
        g (float[5] v, float[5, 6] m, float[4, 6] m2) => (float[a] y, float[b] z) {{
          y = MatMul (v, m)
          z = MatMul (m2, y)
        }}"""
    )
    assert analyze(model).macs == 5 * 6 + 4 * 6


def test_attention_block_closed_form_with_symbolic_batch():
    s, d = 16, 32
    model = build(
        f"""{HEADER}
        g (float[N, {s}, {d}] x) => (float y) {{
          q = MatMul (x, wq)
          k = MatMul (x, wk)
          v = MatMul (x, wv)
          kt = Transpose <perm=[0, 2, 1]> (k)
          scores = MatMul (q, kt)
          p = Softmax <axis=-1> (scores)
          ctx = MatMul (p, v)
          y = MatMul (ctx, wo)
        }}""",
        wq=randn(d, d, seed=1),
        wk=randn(d, d, seed=2),
        wv=randn(d, d, seed=3),
        wo=randn(d, d, seed=4),
    )
    stats = analyze(model)
    # projections 4·S·d², scores S²·d, weighted values S²·d (batch taken as 1)
    assert stats.macs == 4 * s * d * d + 2 * s * s * d
    assert stats.assumed_dims == {"N": 1}
    assert stats.flops_unknown == []
    assert stats.params == 4 * d * d


def test_mlp_closed_form():
    widths = [64, 128, 96, 10]
    batch = 8
    nodes, weights, prev = [], {}, "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        weights[f"w{i}"] = randn(b, a, seed=i)
        weights[f"b{i}"] = randn(b, seed=10 + i)
        nodes.append(f"h{i} = Gemm <transB=1> ({prev}, w{i}, b{i})")
        prev = f"h{i}"
    body = "\n".join(nodes) + f"\ny = Relu ({prev})"
    model = build(
        f"""{HEADER}
        g (float[{batch}, {widths[0]}] x) => (float y) {{ {body} }}""",
        **weights,
    )
    stats = analyze(model)
    assert stats.macs == batch * sum(a * b for a, b in zip(widths, widths[1:], strict=False))
    assert stats.params == sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    assert stats.weight_bytes == 4 * stats.params


def test_einsum_two_operands():
    model = build(
        f"""{HEADER}
        g (float[2, 3, 4] a, float[2, 4, 5] b) => (float y) {{
          y = Einsum <equation="bij,bjk->bik"> (a, b)
        }}"""
    )
    assert analyze(model).macs == 2 * 3 * 4 * 5


def test_unknown_dims_make_a_lower_bound_and_dims_fill_them():
    model = build(
        f"""{HEADER}
        g (float[batch, seq, 64] x) => (float y) {{
          h = MatMul (x, w)
          y = Relu (h)
        }}""",
        w=randn(64, 32),
    )
    stats = analyze(model)
    assert stats.macs == 0
    assert stats.flops_unknown == ["MatMul#0"]
    assert stats.assumed_dims == {"batch": 1}
    filled = analyze(model, dims={"seq": 10})
    assert filled.macs == 10 * 64 * 32
    assert filled.flops_unknown == []
    assert filled.assumed_dims == {"batch": 1, "seq": 10}


def test_unmodelled_heavy_ops_are_listed_not_counted_as_zero():
    model = build(
        """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[1, 4, 8] x) => (float[1, 4, 8] y) {
          y = com.microsoft.Attention <num_heads=2> (x, w, b)
        }""",
        w=randn(8, 24),
        b=randn(24),
    )
    stats = analyze(model)
    assert stats.flops_unknown == ["Attention#0"]
    assert stats.macs == 0


def test_the_users_model_is_not_changed():
    model = build(
        f"""{HEADER}
        g (float[N, 3, 8, 8] x) => (float y) {{
          h = Conv <pads=[1, 1, 1, 1]> (x, w)
          y = Relu (h)
        }}""",
        w=randn(4, 3, 3, 3),
    )
    before = ir.serde.serialize_model(model.ir).SerializeToString()
    analyze(model)
    assert ir.serde.serialize_model(model.ir).SerializeToString() == before
    assert str(model.graph.inputs[0].shape[0]) == "N"
    assert model.graph.node(0).outputs[0].shape is None


# ---------------------------------------------------------------------------- params, sparsity


def test_params_include_constants_and_sparsity_counts_only_float_weights():
    w = randn(4, 3, 3, 3)
    w[:2] = 0.0  # 54 zeros of 108
    w[3, 0, 0, 0] = -0.0  # negative zero is a zero too
    bias = np.zeros(4, np.float32)  # a bias: not counted in sparsity
    fc = randn(10, 4 * 6 * 6, seed=5)
    fc[:, :36] = 0.0  # 360 zeros
    model = build(
        f"""{HEADER}
        g (float[1, 3, 8, 8] x) => (float y) {{
          h = Conv (x, w, bias)
          s = Constant <value = int64[2] {{1, -1}}> ()
          f = Reshape (h, s)
          y = Gemm <transB=1> (f, fc)
        }}""",
        w=w,
        bias=bias,
        fc=fc,
    )
    stats = analyze(model)
    assert stats.params == w.size + bias.size + fc.size + 2
    assert stats.weight_bytes == 4 * (w.size + bias.size + fc.size) + 8 * 2
    assert stats.zero_params == 54 + 1 + 360
    assert stats.sparsity == pytest.approx((54 + 1 + 360) / (w.size + fc.size))
    assert stats.op_histogram == {"Conv": 1, "Constant": 1, "Reshape": 1, "Gemm": 1}
    assert stats.nodes == 4
    # Conv 1·4·6·6·27 + Gemm 1·144·10
    assert stats.macs == 4 * 36 * 27 + 144 * 10


def test_shared_weight_counted_once_and_integer_weights_skipped():
    w = randn(8, 8)
    w[0] = 0.0
    model = build(
        f"""{HEADER}
        g (float[2, 8] x, int8[2, 8] i) => (float[a, b] y, int32[c, d] z) {{
          a = MatMul (x, w)
          y = MatMul (a, w)
          z = MatMulInteger (i, q)
        }}""",
        w=w,
        q=np.zeros((8, 8), np.int8),
    )
    stats = analyze(model)
    assert stats.zero_params == 8
    assert stats.sparsity == pytest.approx(8 / 64)
    assert stats.macs == 3 * 2 * 8 * 8


def test_op_histogram_orders_by_count_and_names_domains():
    model = build(
        """<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[2] x) => (float y) {
          a = Relu (x)
          b = Relu (a)
          c = com.example.Custom (b)
          y = Neg (c)
        }"""
    )
    stats = analyze(model)
    assert list(stats.op_histogram.items()) == [("Relu", 2), ("com.example.Custom", 1), ("Neg", 1)]


def test_external_data_is_not_loaded(tmp_path):
    w = randn(64, 3, 3, 3)
    w[:16] = 0.0
    built = build(
        f"""{HEADER}
        g (float[1, 3, 16, 16] x) => (float[a, b, c, d] y) {{
          y = Conv (x, w)
        }}""",
        w=w,
    )
    saved = save_model(built, tmp_path / "m.onnx", external_data=True)
    assert saved.data_path is not None
    model = load_model(saved.path)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    stats = analyze(model, file_bytes=saved.total_bytes())
    assert stats.params == w.size
    assert stats.weight_bytes == w.nbytes
    assert stats.zero_params == 16 * 27
    assert stats.file_bytes == saved.total_bytes()
    assert stats.macs == 64 * 14 * 14 * 27
    # The model's own tensor was never mapped: analysis used a private mapping, now closed.
    assert tensor.raw is None


# ---------------------------------------------------------------------------- output


def test_to_dict_is_json_and_tables_render():
    model = build(
        f"""{HEADER}
        g (float[N, 4] x) => (float[N, 3] y) {{
          y = Gemm <transB=1> (x, w)
        }}""",
        w=randn(3, 4),
    )
    stats = analyze(model, file_bytes=1234)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["macs"] == 12 and data["flops"] == 24
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert data["assumed_dims"] == {"N": 1}
    assert data["opset"] == 17 and data["ir_version"] == 8
    from rich.console import Console

    console = Console(width=120, record=True)
    for table in stats.tables():
        console.print(table)
    text = console.export_text()
    assert "Gemm" in text and "N=1" in text and "1.21 KiB" in text
    assert isinstance(stats, ModelStats)

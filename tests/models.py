"""Test models built in code, shared by the test suite.

Every builder returns an `onnx.ModelProto` made with `onnx.helper` and numpy from a fixed seed,
at IR version 10 (onnx.helper's default, 14 with onnx 1.23, is newer than ONNX Runtime 1.31
reads) and ONNX opset 17 unless it says otherwise. `feeds(model)` makes matching random inputs.

- `conv_bn`: Conv (plain, grouped or depthwise) -> BatchNormalization -> Relu
- `conv_transpose_bn`: ConvTranspose (optionally grouped) -> BatchNormalization
- `gemm_bn`: Gemm (transB, alpha, beta, C of several shapes) -> BatchNormalization
- `small_cnn`: all of the above plus a residual Add, a Dropout, an Identity, duplicated
  initializers and a constant subgraph to fold
- `transformer_block`: LayerNormalization, q/k/v MatMuls, heads via Reshape/Transpose,
  Softmax attention, an Erf GELU MLP, residual Adds and a Dropout
- `bn_shared_output`, `bn_training`, `bn_params_from_inputs`: BatchNormalizations that must
  not be folded
- `dropout_identity`, `duplicated_initializers`, `constant_subgraph`, `if_with_subgraphs`,
  `loop_with_body`: one rewrite each
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17
FLOAT = TensorProto.FLOAT


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    name: str = "test",
    opset: int = OPSET,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(model: onnx.ModelProto, *, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer; dynamic dims = batch."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            out[value.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            out[value.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            out[value.name] = rng.standard_normal(shape).astype(dtype)
    return out


class _Weights:
    """Named initializers from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.tensors: list[onnx.TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def normal(
        self, name: str, shape: Sequence[int], scale: float = 0.3, dtype: type = np.float32
    ) -> str:
        return self.add(name, (self.rng.standard_normal(shape) * scale).astype(dtype))

    def batchnorm(self, prefix: str, channels: int) -> list[str]:
        """scale, bias, mean, var of a BatchNormalization (var well away from zero)."""
        return [
            self.add(f"{prefix}_scale", self.rng.uniform(0.5, 1.5, channels).astype(np.float32)),
            self.add(f"{prefix}_bias", self.rng.uniform(-0.5, 0.5, channels).astype(np.float32)),
            self.add(f"{prefix}_mean", self.rng.uniform(-0.5, 0.5, channels).astype(np.float32)),
            self.add(f"{prefix}_var", self.rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        ]


def _vi(name: str, shape: Sequence[int | str], elem_type: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


#: A graph input/output description (float32 unless told), for tests building their own models.
value_info = _vi


def conv_bn(
    *,
    groups: int = 1,
    channels: int = 8,
    bias: bool = True,
    dtype: type = np.float32,
    seed: int = 0,
) -> onnx.ModelProto:
    """x[N,C,8,8] -> Conv(3x3, groups) -> BatchNormalization -> Relu -> y.

    groups == channels makes it depthwise. With dtype float16 the activations and Conv weights
    are float16 and the BatchNormalization parameters stay float32 (allowed since opset 15).
    """
    w = _Weights(seed)
    conv_inputs = ["x", w.normal("w", [channels, channels // groups, 3, 3], dtype=dtype)]
    if bias:
        conv_inputs.append(w.normal("b", [channels], dtype=dtype))
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1], group=groups),
        helper.make_node(
            "BatchNormalization",
            ["c", *w.batchnorm("bn", channels)],
            ["n"],
            name="bn",
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [_vi("x", ["N", channels, 8, 8], elem_type)],
        [_vi("y", ["N", channels, 8, 8], elem_type)],
        w.tensors,
        name="conv_bn",
    )


def conv_transpose_bn(*, groups: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x[N,4,5,5] -> ConvTranspose(stride 2, groups; weight [Cin, Cout/g, k, k]) -> BN -> y."""
    w = _Weights(seed)
    cin, cout = 4, 6
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", w.normal("w", [cin, cout // groups, 3, 3]), w.normal("b", [cout])],
            ["c"],
            name="deconv",
            strides=[2, 2],
            group=groups,
        ),
        helper.make_node("BatchNormalization", ["c", *w.batchnorm("bn", cout)], ["y"], name="bn"),
    ]
    return make_model(
        nodes, [_vi("x", ["N", cin, 5, 5])], [_vi("y", ["N", cout, 11, 11])], w.tensors
    )


def gemm_bn(
    *,
    trans_b: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    c_shape: Sequence[int] | None = (5,),
    seed: int = 0,
) -> onnx.ModelProto:
    """x[3,4] -> Gemm(alpha, beta, transB, C of c_shape or none) -> BatchNormalization -> y[3,5]."""
    w = _Weights(seed)
    inputs = ["x", w.normal("w", [5, 4] if trans_b else [4, 5])]
    if c_shape is not None:
        inputs.append(w.normal("c", c_shape))
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("BatchNormalization", ["g", *w.batchnorm("bn", 5)], ["y"], name="bn"),
    ]
    return make_model(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 5])], w.tensors)


def bn_shared_output(seed: int = 0) -> onnx.ModelProto:
    """The Conv output feeds the BatchNormalization and a Relu: BN must stay."""
    w = _Weights(seed)
    nodes = [
        helper.make_node("Conv", ["x", w.normal("w", [4, 4, 1, 1])], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", *w.batchnorm("bn", 4)], ["y"], name="bn"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    return make_model(
        nodes,
        [_vi("x", [1, 4, 3, 3])],
        [_vi("y", [1, 4, 3, 3]), _vi("r", [1, 4, 3, 3])],
        w.tensors,
    )


def bn_training(seed: int = 0) -> onnx.ModelProto:
    """BatchNormalization with training_mode=1 and its running statistics used: must stay."""
    w = _Weights(seed)
    nodes = [
        helper.make_node("Conv", ["x", w.normal("w", [4, 4, 1, 1])], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["c", *w.batchnorm("bn", 4)],
            ["y", "running_mean", "running_var"],
            name="bn",
            training_mode=1,
        ),
    ]
    return make_model(
        nodes,
        [_vi("x", [2, 4, 3, 3])],
        [_vi("y", [2, 4, 3, 3]), _vi("running_mean", [4]), _vi("running_var", [4])],
        w.tensors,
    )


def bn_params_from_inputs(seed: int = 0) -> onnx.ModelProto:
    """BatchNormalization whose mean is a graph input (fed at run time): must stay."""
    w = _Weights(seed)
    scale, bias, _, var = w.batchnorm("bn", 4)
    nodes = [
        helper.make_node("Conv", ["x", w.normal("w", [4, 4, 1, 1])], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", scale, bias, "mean", var], ["y"], name="bn"),
    ]
    return make_model(
        nodes,
        [_vi("x", [1, 4, 3, 3]), _vi("mean", [4])],
        [_vi("y", [1, 4, 3, 3])],
        w.tensors,
    )


def dropout_identity() -> onnx.ModelProto:
    """x -> Identity -> Dropout(ratio, training_mode=false) -> Relu -> Dropout(no mode) -> y,
    plus a Dropout whose mask is a graph output (must stay)."""
    w = _Weights(0)
    ratio = w.add("ratio", np.array(0.5, np.float32))
    mode = w.add("mode", np.array(False))
    nodes = [
        helper.make_node("Identity", ["x"], ["i"], name="id"),
        helper.make_node("Dropout", ["i", ratio, mode], ["d"], name="drop1"),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d2"], name="drop2"),
        helper.make_node("Identity", ["d2"], ["y"], name="id_out"),
        helper.make_node("Dropout", ["r"], ["z", "mask"], name="drop_mask"),
    ]
    return make_model(
        nodes,
        [_vi("x", ["N", 6])],
        [_vi("y", ["N", 6]), _vi("z", ["N", 6]), _vi("mask", ["N", 6], TensorProto.BOOL)],
        w.tensors,
    )


def duplicated_initializers() -> onnx.ModelProto:
    """Three initializers with the same bytes (two identical, one a different shape)."""
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensors = [
        numpy_helper.from_array(values, "a"),
        numpy_helper.from_array(values.copy(), "b"),
        numpy_helper.from_array(values.reshape(3, 2), "c_other_shape"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "a"], ["s"], name="add"),
        helper.make_node("Mul", ["s", "b"], ["y"], name="mul"),
        helper.make_node("MatMul", ["y", "c_other_shape"], ["z"], name="matmul"),
    ]
    return make_model(
        nodes, [_vi("x", ["N", 3])], [_vi("y", ["N", 3]), _vi("z", ["N", 2])], tensors
    )


def constant_subgraph() -> onnx.ModelProto:
    """y = x * (Sqrt(c) + Constant) reshaped; the parenthesis folds to one initializer,
    and a graph output computed from constants only becomes a Constant node."""
    c = numpy_helper.from_array(np.array([1.0, 4.0, 9.0, 16.0], np.float32), "c")
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    nodes = [
        helper.make_node("Sqrt", ["c"], ["root"], name="sqrt"),
        helper.make_node(
            "Constant",
            [],
            ["one"],
            name="one",
            value=numpy_helper.from_array(np.ones(4, np.float32)),
        ),
        helper.make_node("Add", ["root", "one"], ["k"], name="add"),
        helper.make_node("Reshape", ["k", "shape"], ["k2"], name="reshape"),
        helper.make_node("Mul", ["x", "k2"], ["y"], name="mul"),
        helper.make_node("Neg", ["k"], ["const_out"], name="neg"),
    ]
    return make_model(
        nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4]), _vi("const_out", [4])], [c, shape]
    )


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """A small CNN with every cleanup opportunity.

    x[N,3,16,16] -> Conv+BN+Relu -> depthwise Conv+BN+Relu -> grouped 1x1 Conv+BN -> Add
    (residual) -> Relu -> ConvTranspose(group 2)+BN+Relu -> GlobalAveragePool -> Flatten ->
    Gemm+BN -> Dropout -> Identity -> Mul(scale from a constant subgraph) -> Add(offset_a)
    -> Add(offset_b) -> y[N,10]. offset_a and offset_b are byte-identical copies, and one
    initializer is unused.
    """
    w = _Weights(seed)
    mk = helper.make_node
    scale_base = w.add("scale_base", np.full(10, 4.0, np.float32))
    scale_copy = w.add("scale_copy", np.full(10, 4.0, np.float32))
    offset_a = w.add("offset_a", np.linspace(-1, 1, 10, dtype=np.float32))
    offset_b = w.add("offset_b", np.linspace(-1, 1, 10, dtype=np.float32))
    w.add("unused", np.zeros(3, np.float32))
    nodes = [
        mk("Conv", ["x", w.normal("w1", [8, 3, 3, 3]), w.normal("b1", [8])], ["c1"], pads=[1] * 4),
        mk("BatchNormalization", ["c1", *w.batchnorm("bn1", 8)], ["n1"]),
        mk("Relu", ["n1"], ["a"]),
        mk("Conv", ["a", w.normal("w2", [8, 1, 3, 3])], ["c2"], pads=[1] * 4, group=8),
        mk("BatchNormalization", ["c2", *w.batchnorm("bn2", 8)], ["n2"]),
        mk("Relu", ["n2"], ["r2"]),
        mk("Conv", ["r2", w.normal("w3", [8, 4, 1, 1])], ["c3"], group=2),
        mk("BatchNormalization", ["c3", *w.batchnorm("bn3", 8)], ["n3"]),
        mk("Add", ["n3", "a"], ["res"]),
        mk("Relu", ["res"], ["r3"]),
        mk(
            "ConvTranspose",
            ["r3", w.normal("w4", [8, 2, 2, 2]), w.normal("b4", [4])],
            ["c4"],
            strides=[2, 2],
            group=2,
        ),
        mk("BatchNormalization", ["c4", *w.batchnorm("bn4", 4)], ["n4"]),
        mk("Relu", ["n4"], ["r4"]),
        mk("GlobalAveragePool", ["r4"], ["gap"]),
        mk("Flatten", ["gap"], ["flat"]),
        mk(
            "Gemm",
            ["flat", w.normal("w5", [10, 4]), w.normal("b5", [10])],
            ["g"],
            transB=1,
            alpha=0.7,
            beta=1.3,
        ),
        mk("BatchNormalization", ["g", *w.batchnorm("bn5", 10)], ["n5"]),
        mk("Dropout", ["n5"], ["d"]),
        mk("Identity", ["d"], ["i"]),
        mk("Sqrt", [scale_base], ["scale_root"]),
        mk("Mul", ["scale_root", scale_copy], ["scale"]),
        mk("Mul", ["i", "scale"], ["scaled"]),
        mk("Add", ["scaled", offset_a], ["shifted"]),
        mk("Add", ["shifted", offset_b], ["y"]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}_{i}"
    return make_model(
        nodes, [_vi("x", ["N", 3, 16, 16])], [_vi("y", ["N", 10])], w.tensors, name="small_cnn"
    )


def transformer_block(
    *, seq: int = 8, dim: int = 16, heads: int = 2, hidden: int = 32, seed: int = 0
) -> onnx.ModelProto:
    """A pre-norm transformer encoder block, as exporters write it.

    x[N,S,D] -> LayerNormalization -> q/k/v MatMul+Add -> Reshape [0,0,H,D/H] -> Transpose
    -> MatMul(q, k^T) * (1/Sqrt(D/H), a constant subgraph) -> Softmax -> MatMul v -> Transpose
    -> Reshape -> MatMul+Add -> residual Add -> LayerNormalization -> MatMul -> GELU (Erf) ->
    MatMul -> Dropout -> residual Add -> Identity -> y[N,S,D].
    """
    w = _Weights(seed)
    mk = helper.make_node
    head_dim = dim // heads
    heads_shape = w.add("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = w.add("merge_shape", np.array([0, 0, dim], np.int64))
    head_dim_c = w.add("head_dim", np.array(head_dim, np.float32))
    one = w.add("one", np.array(1.0, np.float32))
    half = w.add("half", np.array(0.5, np.float32))
    sqrt2 = w.add("sqrt2", np.array(np.sqrt(2.0), np.float32))
    nodes = [
        mk(
            "LayerNormalization",
            [
                "x",
                w.add("ln1_g", w.rng.uniform(0.5, 1.5, dim).astype(np.float32)),
                w.normal("ln1_b", [dim]),
            ],
            ["ln1"],
            axis=-1,
            epsilon=1e-5,
        ),
    ]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            mk("MatMul", ["ln1", w.normal(f"w{name}", [dim, dim])], [f"{name}_mm"]),
            mk("Add", [f"{name}_mm", w.normal(f"b{name}", [dim])], [f"{name}_lin"]),
            mk("Reshape", [f"{name}_lin", heads_shape], [f"{name}_heads"]),
            mk("Transpose", [f"{name}_heads"], [f"{name}_t"], perm=perm),
        ]
    nodes += [
        mk("Sqrt", [head_dim_c], ["sqrt_hd"]),
        mk("Div", [one, "sqrt_hd"], ["inv_sqrt_hd"]),
        mk("MatMul", ["q_t", "k_t"], ["scores_raw"]),
        mk("Mul", ["scores_raw", "inv_sqrt_hd"], ["scores"]),
        mk("Softmax", ["scores"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "v_t"], ["ctx_heads"]),
        mk("Transpose", ["ctx_heads"], ["ctx_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["ctx_t", merge_shape], ["ctx"]),
        mk("MatMul", ["ctx", w.normal("wo", [dim, dim])], ["o_mm"]),
        mk("Add", ["o_mm", w.normal("bo", [dim])], ["attn"]),
        mk("Add", ["x", "attn"], ["h1"]),
        mk(
            "LayerNormalization",
            [
                "h1",
                w.add("ln2_g", w.rng.uniform(0.5, 1.5, dim).astype(np.float32)),
                w.normal("ln2_b", [dim]),
            ],
            ["ln2"],
            axis=-1,
        ),
        mk("MatMul", ["ln2", w.normal("w1", [dim, hidden])], ["f1_mm"]),
        mk("Add", ["f1_mm", w.normal("b1", [hidden])], ["f1"]),
        mk("Div", ["f1", sqrt2], ["gelu_scaled"]),
        mk("Erf", ["gelu_scaled"], ["gelu_erf"]),
        mk("Add", ["gelu_erf", one], ["gelu_1p"]),
        mk("Mul", ["f1", "gelu_1p"], ["gelu_x"]),
        mk("Mul", ["gelu_x", half], ["gelu"]),
        mk("MatMul", ["gelu", w.normal("w2", [hidden, dim])], ["f2_mm"]),
        mk("Add", ["f2_mm", w.normal("b2", [dim])], ["f2"]),
        mk("Dropout", ["f2"], ["f2_drop"]),
        mk("Add", ["h1", "f2_drop"], ["h2"]),
        mk("Identity", ["h2"], ["y"]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}_{i}"
    return make_model(
        nodes,
        [_vi("x", ["N", seq, dim])],
        [_vi("y", ["N", seq, dim])],
        w.tensors,
        name="transformer_block",
    )


def if_with_subgraphs(seed: int = 0) -> onnx.ModelProto:
    """An If whose branches hold Identity, Dropout, Conv+BN and a constant subgraph.

    The branches read the outer `x` and an outer weight; the If's outputs are graph outputs.
    """
    w = _Weights(seed)
    mk = helper.make_node
    outer_w = w.normal("outer_w", [4, 4, 1, 1])
    bn = w.batchnorm("bn", 4)
    branch_w = _Weights(seed + 1)
    two = branch_w.add("two", np.array(2.0, np.float32))
    then_graph = helper.make_graph(
        [
            mk("Conv", ["x", outer_w], ["t_conv"]),
            mk("BatchNormalization", ["t_conv", *bn], ["t_bn"]),
            mk("Sqrt", [two], ["t_root"]),
            mk("Mul", ["t_bn", "t_root"], ["t_mul"]),
            mk("Dropout", ["t_mul"], ["t_drop"]),
            mk("Identity", ["t_drop"], ["t_out"]),
        ],
        "then",
        [],
        [_vi("t_out", [1, 4, 3, 3])],
        branch_w.tensors,
    )
    else_graph = helper.make_graph(
        [mk("Neg", ["x"], ["e_neg"]), mk("Identity", ["e_neg"], ["e_out"])],
        "else",
        [],
        [_vi("e_out", [1, 4, 3, 3])],
    )
    nodes = [
        mk("ReduceSum", ["x"], ["total"], keepdims=0),
        mk("Greater", ["total", w.add("zero", np.array(0.0, np.float32))], ["cond"]),
        mk("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        mk("Identity", ["branch"], ["y"]),
    ]
    return make_model(nodes, [_vi("x", [1, 4, 3, 3])], [_vi("y", [1, 4, 3, 3])], w.tensors)


def loop_with_body(seed: int = 0) -> onnx.ModelProto:
    """A Loop (3 trips) whose body adds a folded constant and passes values through Identity."""
    w = _Weights(seed)
    mk = helper.make_node
    body_w = _Weights(seed + 1)
    base = body_w.add("body_base", np.full(4, 0.25, np.float32))
    body = helper.make_graph(
        [
            mk("Identity", ["cond_in"], ["cond_out"]),
            mk("Mul", [base, base], ["step"]),
            mk("Add", ["acc_in", "step"], ["acc_sum"]),
            mk("Identity", ["acc_sum"], ["acc_out"]),
            mk("Mul", ["acc_sum", "x"], ["scan_out"]),
        ],
        "body",
        [
            _vi("iter", [], TensorProto.INT64),
            _vi("cond_in", [], TensorProto.BOOL),
            _vi("acc_in", [4]),
        ],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [4]), _vi("scan_out", [4])],
        body_w.tensors,
    )
    trips = w.add("trips", np.array(3, np.int64))
    keep_going = w.add("keep_going", np.array(True))
    nodes = [
        mk("Identity", ["x"], ["x_id"]),
        mk("Loop", [trips, keep_going, "x_id"], ["acc", "scans"], body=body),
    ]
    return make_model(nodes, [_vi("x", [4])], [_vi("acc", [4]), _vi("scans", [3, 4])], w.tensors)


ALL_BUILDERS = {
    "conv_bn": conv_bn,
    "conv_bn_depthwise": lambda: conv_bn(groups=8, bias=False),
    "conv_bn_grouped": lambda: conv_bn(groups=2),
    "conv_transpose_bn": conv_transpose_bn,
    "conv_transpose_bn_grouped": lambda: conv_transpose_bn(groups=2),
    "gemm_bn": gemm_bn,
    "gemm_bn_no_c": lambda: gemm_bn(trans_b=0, c_shape=None, alpha=0.5),
    "gemm_bn_c_matrix": lambda: gemm_bn(c_shape=(3, 5), beta=0.25, alpha=2.0),
    "gemm_bn_c_column": lambda: gemm_bn(c_shape=(3, 1), beta=0.5),
    "gemm_bn_c_scalar": lambda: gemm_bn(trans_b=0, c_shape=(), beta=-1.5),
    "small_cnn": small_cnn,
    "transformer_block": transformer_block,
    "dropout_identity": dropout_identity,
    "duplicated_initializers": duplicated_initializers,
    "constant_subgraph": constant_subgraph,
    "bn_shared_output": bn_shared_output,
    "bn_training": bn_training,
    "bn_params_from_inputs": bn_params_from_inputs,
    "if_with_subgraphs": if_with_subgraphs,
    "loop_with_body": loop_with_body,
}
"""Every builder with default arguments (or a named variant), for tests that run them all."""

"""Training on ONNX Runtime: the loss falls, pruned weights stay exactly zero, the trained
weights go back into the unchanged graph; refusals come before anything runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import GraphoptError
from graphopt.passes.prune.masks import PackedMask
from graphopt.runtime import create_session
from graphopt.train import SGD, AdamW, GradientError, Loss, Trainer, build_training_graph
from graphopt.train.rules import RULES
from tests.train.gradcheck import model_from_proto, op_model
from tests.train.nets import mlp, resnet_like


def _blobs(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian blobs in 4-D: a problem an MLP learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centers = rng.standard_normal((3, 4)) * 2
    x = centers[labels] + rng.standard_normal((n, 4)) * 0.5
    return x.astype(np.float32), labels.astype(np.int64)


def _feeds(x, labels):
    return {"x": x, "logits.labels": labels}


@pytest.mark.parametrize("optimizer", [SGD(lr=0.1, momentum=0.9), AdamW(lr=0.02)])
def test_training_reduces_the_loss(optimizer):
    x, labels = _blobs()
    trainer = Trainer(mlp(), [Loss.cross_entropy("logits")], optimizer, threads=1)
    first = trainer.step(_feeds(x, labels)).loss
    for _ in range(40):
        last = trainer.step(_feeds(x, labels)).loss
    assert last < 0.3 * first
    # The weights written back give the same loss on the inference graph.
    trained = trainer.trained_model()
    session = create_session(trained, device="cpu", threads=1)
    logits = session.run({"x": x})["logits"]
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(len(x)), labels] - np.log(np.exp(z).sum(1))).mean()
    assert ce == pytest.approx(trainer.gradients(_feeds(x, labels))[0], rel=1e-4)


def _pruned_mlp():
    model = mlp()
    w = model.graph.initializers["w1"].const_value.numpy().copy()
    keep = np.random.default_rng(5).random(w.shape) > 0.5
    w[~keep] = 0
    model.graph.initializers["w1"].const_value = onnx_ir_tensor(w, "w1")
    model.metadata["masks"] = {"w1": PackedMask.pack(keep)}
    return model, keep


def onnx_ir_tensor(array, name):
    import onnx_ir as ir

    return ir.tensor(array, name=name)


@pytest.mark.parametrize(
    "optimizer",
    [SGD(lr=0.1, momentum=0.9, weight_decay=1e-3), AdamW(lr=0.02, weight_decay=0.1)],
    ids=["sgd", "adamw"],
)
def test_pruned_weights_stay_exactly_zero(optimizer):
    model, keep = _pruned_mlp()
    before = [(n.op_type, n.name, [v.name for v in n.inputs]) for n in model.graph]
    x, labels = _blobs()
    trainer = Trainer(model, [Loss.cross_entropy("logits")], optimizer, threads=1)
    for _ in range(10):
        trainer.step(_feeds(x, labels))
    trained = trainer.trained_model()
    w = trained.graph.initializers["w1"].const_value.numpy()
    assert np.all(w[~keep] == 0.0)
    original = model.graph.initializers["w1"].const_value.numpy()
    assert np.mean(w[keep] != original[keep]) > 0.9  # the kept weights did train
    after = [(n.op_type, n.name, [v.name for v in n.inputs]) for n in trained.graph]
    assert after == before
    assert trained.metadata["masks"]["w1"].same_as(model.metadata["masks"]["w1"])
    # The input model is untouched.
    assert np.array_equal(model.graph.initializers["w1"].const_value.numpy(), original)


def test_without_masks_pruned_weights_move():
    model, keep = _pruned_mlp()
    x, labels = _blobs()
    trainer = Trainer(model, [Loss.cross_entropy("logits")], SGD(lr=0.1), use_masks=False)
    for _ in range(3):
        trainer.step(_feeds(x, labels))
    assert np.mean(trainer.params["w1"][~keep] != 0) > 0.5


def test_training_graph_ir_version_is_pinned_for_onnxruntime():
    model = op_model("Gemm", {"a": np.ones((2, 3)), "b": np.ones((3, 4))}, dtype=np.float32)
    model.ir.ir_version = 12
    graph = build_training_graph(model, [Loss.mse("y")])
    assert graph.proto.ir_version <= 10
    create_session(graph.proto.SerializeToString(), device="cpu")  # ORT loads it


def test_distillation_moves_the_student_toward_the_teacher():
    x, _ = _blobs()
    teacher = mlp(seed=7)
    t_logits = create_session(teacher, device="cpu").run({"x": x})["logits"]
    trainer = Trainer(mlp(seed=1), [Loss.distillation("logits", temperature=2.0)], AdamW(lr=0.02))
    feeds = {"x": x, "logits.teacher": t_logits}
    first = trainer.step(feeds).loss
    for _ in range(40):
        last = trainer.step(feeds).loss
    assert last < 0.2 * first


# ---------------------------------------------------------------------------- refusals


def _with_node(op_type: str, domain: str = "", **attrs) -> onnx.ModelProto:
    """x -> Gemm(w) -> <op> -> y: the op sits between a trainable and the loss."""
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm"),
        helper.make_node(op_type, ["h"], ["y"], name="the_op", domain=domain, **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 9
    return proto


def test_op_without_a_rule_is_refused_by_name():
    assert "Softplus" not in RULES  # a float op with no rule (pick another if it gets one)
    with pytest.raises(GradientError, match=r"no gradient rule for Softplus \(1 node: 'the_op'\)"):
        build_training_graph(model_from_proto(_with_node("Softplus")), [Loss.mse("y")])


def test_custom_domain_is_refused():
    model = model_from_proto(_with_node("MyOp", domain="com.example"))
    with pytest.raises(GradientError, match=r"com\.example::MyOp"):
        build_training_graph(model, [Loss.mse("y")])


def test_control_flow_is_refused():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["z"])],
        "branch",
        [],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4])],
    )
    proto = _with_node("Relu")
    cond = onnx.numpy_helper.from_array(np.array(True), "cond")
    proto.graph.initializer.append(cond)
    proto.graph.node.append(
        helper.make_node(
            "If", ["cond"], ["out"], name="iffy", then_branch=branch, else_branch=branch
        )
    )
    proto.graph.output.append(helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [2, 4]))
    with pytest.raises(GradientError, match=r"If \(1 node: 'iffy'\)"):
        build_training_graph(model_from_proto(proto), [Loss.mse("y")])


def test_op_off_the_gradient_path_is_allowed():
    # Erf on the data before the first trainable needs no gradient.
    proto = _with_node("Relu")
    proto.graph.node.insert(0, helper.make_node("Erf", ["x"], ["xe"], name="erf"))
    proto.graph.node[1].input[0] = "xe"
    graph = build_training_graph(model_from_proto(proto), [Loss.mse("y")])
    assert graph.trainables == ["w"]


def test_batchnorm_in_training_mode_is_refused():
    model = op_model(
        "BatchNormalization",
        {"x": np.ones((2, 3, 2, 2)), "s": np.ones(3), "b": np.ones(3), "m": np.zeros(3),
         "v": np.ones(3)},
        {"training_mode": 1},
    )  # fmt: skip
    with pytest.raises(GradientError, match="training mode"):
        build_training_graph(model, [Loss.mse("y")], trainables=["s"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trainables": ["nope"]}, "not initializers: nope"),
        ({"trainables": []}, "empty"),
        ({"outputs": ["missing"]}, "no tensor 'missing'"),
        ({"input_shapes": {"z": [1]}}, "not an input"),
    ],
)
def test_bad_arguments_are_graphopt_errors(kwargs, message):
    with pytest.raises(GraphoptError, match=message):
        build_training_graph(resnet_like(np.float32), [Loss.mse("logits")], **kwargs)


def test_bad_losses_are_refused():
    model = resnet_like(np.float32)
    with pytest.raises(GraphoptError, match="temperature"):
        build_training_graph(model, [Loss.distillation("logits", temperature=0.0)])
    with pytest.raises(GraphoptError, match="at least one loss"):
        build_training_graph(model, [])
    with pytest.raises(GraphoptError, match="class axis 3"):
        build_training_graph(model, [Loss.cross_entropy("logits", axis=3)])
    with pytest.raises(GraphoptError, match="learning rate"):
        SGD(lr=-1.0)


def test_missing_feed_is_a_data_error():
    trainer = Trainer(mlp(), [Loss.cross_entropy("logits")], SGD())
    with pytest.raises(GraphoptError, match="logits.labels"):
        trainer.step({"x": np.zeros((2, 4), np.float32)})


# ---------------------------------------------------------------------------- tied weights


def _torch_tied_net():
    """Two conv+BN layers exported by torch.onnx with fresh BatchNorms: the exporter keeps
    one ones and one zeros initializer and feeds the other BN inputs through Identity nodes
    (4.weight = Identity(1.weight), 1.running_var = Identity(1.weight), ...)."""
    torch = pytest.importorskip("torch")
    import io

    import onnx_ir as ir

    from graphopt.model import Model

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).eval()  # fmt: skip
    buf = io.BytesIO()
    torch.onnx.export(
        net, (torch.randn(8, 3, 5, 5),), buf, input_names=["x"], output_names=["logits"],
        opset_version=18, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    assert any(n.op_type == "Identity" and n.output[0] == "4.weight" for n in proto.graph.node)
    return net, Model(ir=ir.from_proto(proto))


def test_identity_shared_initializers_train_separately():
    torch = pytest.importorskip("torch")

    net, model = _torch_tied_net()
    graph = build_training_graph(model, [Loss.cross_entropy("logits")])
    assert {"1.weight", "1.bias", "4.weight", "4.bias"} <= set(graph.trainables)
    assert graph.untied["4.weight"] == "1.weight"
    assert graph.untied["1.running_var"] == "1.weight"
    # The untied gradients are torch's, BN by BN.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 8)
    feeds = {"x": x, "logits.labels": labels}
    trainer = Trainer(model, [Loss.cross_entropy("logits")], SGD(lr=0.5, momentum=0.0))
    _, grads, _ = trainer.gradients(feeds)
    torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(labels)).backward()
    for name, p in net.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-6)
    for _ in range(3):
        trainer.step(feeds)
    trained = trainer.trained_model()
    inits = {k: v.const_value.numpy() for k, v in trained.graph.initializers.items()}
    assert not np.allclose(inits["1.weight"], inits["4.weight"])
    assert not np.allclose(inits["1.bias"], inits["4.bias"])
    # Frozen statistics that shared a trained weight's value keep their own value.
    np.testing.assert_array_equal(inits["1.running_var"], np.ones(4, np.float32))
    np.testing.assert_array_equal(inits["4.running_mean"], np.zeros(4, np.float32))
    # The node list changes only by the Identity nodes that became initializers.
    before = [(n.op_type, n.name) for n in model.graph]
    after = [(n.op_type, n.name) for n in trained.graph]
    assert after == [b for b in before if b[0] != "Identity"]
    # The written-back model computes what the trainer trained.
    logits = create_session(trained, device="cpu").run({"x": x})["logits"]
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(8), labels] - np.log(np.exp(z).sum(1))).mean()
    assert ce == pytest.approx(trainer.gradients(feeds)[0], rel=1e-4)


def test_identity_sharing_is_kept_when_asked():
    _, model = _torch_tied_net()
    graph = build_training_graph(model, [Loss.cross_entropy("logits")], untie_identities=False)
    assert graph.untied == {}
    assert "4.weight" not in graph.trainables and "1.weight" in graph.trainables
    # A trainer that trains nothing tied leaves the Identity nodes in place.
    trainer = Trainer(model, [Loss.cross_entropy("logits")], SGD(), trainables=["0.weight"])
    trained = trainer.trained_model()
    assert [n.op_type for n in trained.graph] == [n.op_type for n in model.graph]


def test_weights_held_as_constant_nodes_point_to_cleanup():
    # Paddle's exports hold every weight in a Constant node: nothing to train, and the
    # error says which pass turns them into initializers.
    weight = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=weight),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    with pytest.raises(GraphoptError, match="no float initializers") as caught:
        build_training_graph(model_from_proto(proto), [Loss.mse("y")])
    assert "--pass cleanup --pass distill" in (caught.value.hint or "")

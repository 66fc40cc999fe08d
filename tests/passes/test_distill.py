"""The distill pass, its teacher sources and `export-logits`.

Independent checks: exported logits against ONNX Runtime runs of the teacher; the held-out
loss against a numpy KL; accuracy won back on the sample digits model after channel removal
(labels the training never sees); pruned zeros and the node list after training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.context import Context
from graphopt.data import open_dataset
from graphopt.errors import DataError
from graphopt.model import Model, load_model
from graphopt.passes.base import build_options, get_pass
from graphopt.passes.distill import TeacherSpec, export_logits, logits_view
from graphopt.passes.distill.loop import _minibatches
from graphopt.passes.distill.schedule import LearningRate
from graphopt.pipeline import run_pipeline
from graphopt.recipe import inline_recipe
from graphopt.runtime import create_session
from tests.models import make_model

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"


def _dataset(model: Model, source: Path | str, **kwargs):
    return open_dataset(source, model.input_specs(), **kwargs)


def _run(model: Model, ctx: Context, *passes: str):
    return run_pipeline(model, inline_recipe(list(passes)), ctx)


def _mlp(*, softmax: bool, seed: int = 0, hidden: int = 16, outputs: int = 1) -> Model:
    """x[N,8] -> Gemm -> Relu -> Gemm -> (Softmax) ; optionally a second output head."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, hidden)).astype(np.float32) * 0.5, "w1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 5)).astype(np.float32) * 0.5, "w2"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["z"]),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["y"]))
    if outputs == 2:
        inits.append(
            numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "w3")
        )
        nodes.append(helper.make_node("MatMul", ["r", "w3"], ["aux"]))
        outs.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 3]))
    proto = make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], outs, inits
    )
    return Model(ir=ir.from_proto(proto))


def _npz(path: Path, n: int, seed: int = 1, labels: np.ndarray | None = None) -> Path:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    np.savez(path, **arrays)
    return path


def _ort(model: Model | Path, feeds, outputs=None):
    return create_session(model, device="cpu").run(feeds, outputs)


def _ctx(tmp_path: Path, data, **kwargs) -> Context:
    return Context(workdir=tmp_path, calib_data=data, device="cpu", **kwargs)


# ---------------------------------------------------------------------------- teacher side


def test_logits_view_finds_the_softmax_input() -> None:
    assert logits_view(_mlp(softmax=True), "y").tensor == "z"
    assert logits_view(_mlp(softmax=True), "y").axis == 1
    plain = logits_view(_mlp(softmax=False), "y")
    assert (plain.tensor, plain.axis) == ("y", None)
    with pytest.raises(DataError, match="no output 'nope'"):
        logits_view(_mlp(softmax=False), "nope")


def test_export_logits_matches_ort_runs_of_the_teacher(tmp_path: Path) -> None:
    teacher = _mlp(softmax=True, outputs=2)
    data = _dataset(teacher, _npz(tmp_path / "d.npz", 37))
    out = export_logits(teacher, data, tmp_path / "t.npz", outputs=["y", "aux"], batch_size=8)
    saved = np.load(out, allow_pickle=False)
    x = np.load(tmp_path / "d.npz")["x"]
    direct = _ort(teacher, {"x": x}, ["y", "aux"])
    # 'y' ends in a Softmax: its logits z satisfy softmax(z) == y
    z = saved["y"]
    assert z.shape == (37, 5)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), direct["y"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(z.sum(axis=1), 1.0)
    np.testing.assert_allclose(saved["aux"], direct["aux"], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "t.npz"]


def test_export_logits_refuses_several_outputs_in_one_npy(tmp_path: Path) -> None:
    teacher = _mlp(softmax=False, outputs=2)
    data = _dataset(teacher, _npz(tmp_path / "d.npz", 4))
    with pytest.raises(DataError, match="Cannot write logits of 2 output"):
        export_logits(teacher, data, tmp_path / "t.npy", outputs=["y", "aux"])
    assert not (tmp_path / "t.npy").exists()


# ---------------------------------------------------------------------------- bad teachers


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p / "t.npy", np.zeros((19, 5), np.float32)), "have 19 rows"),
        (lambda p: np.save(p / "t.npy", np.zeros((20, 4), np.float32)), r"per-sample shape \[4\]"),
        (lambda p: np.save(p / "t.npy", np.zeros((20, 5), np.int64)), "must be a float array"),
        (
            lambda p: np.save(p / "t.npy", np.array([{"a": 1}] * 20, dtype=object)),
            "pickled",
        ),
        (lambda p: (p / "t.npy").write_bytes(b"not numpy"), "cannot be read"),
    ],
    ids=["count", "shape", "dtype", "pickle", "garbage"],
)
def test_bad_logits_files_fail_before_training(tmp_path: Path, make, message: str) -> None:
    student = _mlp(softmax=False)
    data = _dataset(student, _npz(tmp_path / "d.npz", 20))
    make(tmp_path)
    before = {k: v.const_value.numpy().copy() for k, v in student.graph.initializers.items()}
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"))
    with pytest.raises(DataError, match=message):
        get_pass("distill")().run(student, ctx)
    for name, value in student.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])


def test_npz_logits_must_name_the_outputs(tmp_path: Path) -> None:
    student = _mlp(softmax=False, outputs=2)
    data = _dataset(student, _npz(tmp_path / "d.npz", 20))
    np.savez(tmp_path / "t.npz", y=np.zeros((20, 5), np.float32), other=np.zeros((20, 3)))
    options = build_options(get_pass("distill"), {"outputs": ["y", "aux"]})
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npz"))
    with pytest.raises(DataError, match="no array for output\\(s\\) 'aux'"):
        get_pass("distill")(options).run(student, ctx)


def test_no_teacher_and_no_data_are_clear_errors(tmp_path: Path) -> None:
    student = _mlp(softmax=False)
    with pytest.raises(DataError, match="none was given"):
        get_pass("distill")().run(student, _ctx(tmp_path, None))
    data = _dataset(student, _npz(tmp_path / "d.npz", 8))
    with pytest.raises(DataError, match="needs a teacher"):
        get_pass("distill")().run(student, _ctx(tmp_path, data))


# ---------------------------------------------------------------------------- training


def _digits_pruned(tmp_path: Path) -> tuple[Model, object, object]:
    model = load_model(DIGITS / "model.onnx")
    calib = _dataset(model, DIGITS / "calib.npz")
    ctx = _ctx(tmp_path, calib)
    _run(model, ctx, "cleanup", "channels:ratio=0.5,round_to=1,compensate=none")
    return model, calib, _dataset(model, DIGITS / "val.npz")


def _accuracy(model: Model | Path, val) -> float:
    batch = next(iter(val.batches(1000)))
    logits = _ort(model, batch.feeds)["logits"]
    return float(np.mean(logits.argmax(axis=1) == batch.labels))


def test_distill_from_the_original_wins_back_accuracy(tmp_path: Path) -> None:
    """Channel removal breaks the digits CNN; distillation from the original model, with no
    labels, on the calibration images, brings the accuracy on the labelled validation
    images (never trained on) back near the original's."""
    model = load_model(DIGITS / "model.onnx")
    calib = _dataset(model, DIGITS / "calib.npz")
    val = _dataset(model, DIGITS / "val.npz")
    original = _accuracy(DIGITS / "model.onnx", val)
    ctx = _ctx(tmp_path, calib)
    _run(model, ctx, "cleanup", "channels:ratio=0.5,round_to=1,compensate=none")
    pruned = _accuracy(model, val)
    result = _run(model, ctx, "distill:epochs=6,lr=1e-3")  # ctx.original: still the file
    stats = result.steps[-1].pass_stats
    assert stats["teacher"] == "the original model"
    assert stats["labels_used"] is False
    assert stats["holdout"][stats["best_epoch"]]["loss"] < stats["holdout"][0]["loss"] / 2
    distilled = _accuracy(model, val)
    assert original > 0.97 and pruned < 0.5
    assert distilled > 0.9, (original, pruned, distilled)


def test_distilling_does_not_change_the_graph_and_keeps_pruned_zeros(tmp_path: Path) -> None:
    model = load_model(DIGITS / "model.onnx")
    calib = _dataset(model, DIGITS / "calib.npz")
    ctx = _ctx(tmp_path, calib)
    _run(model, ctx, "cleanup", "prune:sparsity=0.5")
    nodes = [(n.op_type, n.name, [v.name for v in n.inputs]) for n in model.graph]
    zeros = {
        name: value.const_value.numpy() == 0
        for name, value in model.graph.initializers.items()
        if value.const_value.numpy().ndim >= 2
    }
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    assert sum(int(z.sum()) for z in zeros.values()) > 1000
    ctx.teacher = TeacherSpec(model=DIGITS / "model.onnx")
    _run(model, ctx, "distill:epochs=2,lr=1e-3,holdout=0")
    assert [(n.op_type, n.name, [v.name for v in n.inputs]) for n in model.graph] == nodes
    changed = 0
    for name, zero in zeros.items():
        after = model.graph.initializers[name].const_value.numpy()
        assert np.all(after[zero] == 0), name
        changed += int(not np.array_equal(after, before[name]))
    assert changed >= 3


def test_probabilities_from_the_user_train_like_their_logits(tmp_path: Path) -> None:
    """A teacher file of softmax probabilities is read as log(p): the same softmax at every
    temperature, so training follows the same path as with the logits themselves."""
    teacher = _mlp(softmax=True, seed=5)
    data = _dataset(teacher, _npz(tmp_path / "d.npz", 48))
    x = np.load(tmp_path / "d.npz")["x"]
    values = _ort(teacher, {"x": x}, ["y"])
    np.save(tmp_path / "probs.npy", values["y"])
    export_logits(teacher, data, tmp_path / "logits.npy")
    trained = {}
    for name in ("probs", "logits"):
        student = _mlp(softmax=True, seed=6)
        ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / f"{name}.npy"))
        options = build_options(get_pass("distill"), {"epochs": 3, "lr": 1e-2, "batch_size": 8})
        assert get_pass("distill")(options).run(student, ctx).modified
        trained[name] = student.graph.initializers["w2"].const_value.numpy()
    np.testing.assert_allclose(trained["probs"], trained["logits"], rtol=1e-3, atol=1e-4)


def test_holdout_loss_is_the_numpy_kl(tmp_path: Path) -> None:
    """The held-out loss before training equals T²·KL computed here from the two models."""
    teacher, student = _mlp(softmax=False, seed=1), _mlp(softmax=False, seed=2)
    data = _dataset(student, _npz(tmp_path / "d.npz", 40))
    x = np.load(tmp_path / "d.npz")["x"]
    np.save(tmp_path / "t.npy", _ort(teacher, {"x": x}, ["y"])["y"])
    options = build_options(
        get_pass("distill"), {"epochs": 1, "lr": 0.0, "holdout": 0.5, "temperature": 2.0}
    )
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"), seed=3)
    result = get_pass("distill")(options).run(student, ctx)
    # lr=0 cannot beat the untrained student: the model is left as it was, with a warning
    assert not result.modified and "left as they were" in result.warnings[0]
    held = np.zeros(40, bool)
    held[np.random.default_rng(3).choice(40, size=20, replace=False)] = True
    s = _ort(student, {"x": x[held]}, ["y"])["y"] / 2.0
    t = np.load(tmp_path / "t.npy")[held] / 2.0

    def log_softmax(v):
        v = v - v.max(axis=1, keepdims=True)
        return v - np.log(np.exp(v).sum(axis=1, keepdims=True))

    p = np.exp(log_softmax(t))
    kl = 4.0 * np.mean(np.sum(p * (log_softmax(t) - log_softmax(s)), axis=1))
    assert result.stats["holdout"][0]["loss"] == pytest.approx(kl, rel=1e-4)


def test_labels_add_cross_entropy_and_pick_by_accuracy(tmp_path: Path) -> None:
    teacher, student = _mlp(softmax=False, seed=1), _mlp(softmax=False, seed=2)
    x = np.random.default_rng(1).standard_normal((60, 8)).astype(np.float32)
    logits = _ort(teacher, {"x": x}, ["y"])["y"]
    labels = logits.argmax(axis=1).astype(np.int64)
    _npz(tmp_path / "d.npz", 60, labels=labels)
    np.save(tmp_path / "t.npy", logits)
    data = _dataset(student, tmp_path / "d.npz")
    assert data.has_labels
    options = build_options(get_pass("distill"), {"epochs": 4, "lr": 1e-2, "alpha": 0.5})
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"))
    result = get_pass("distill")(options).run(student, ctx)
    assert result.stats["labels_used"]
    scores = result.stats["holdout"]
    assert all(s["accuracy"] is not None for s in scores)
    assert scores[result.stats["best_epoch"]]["accuracy"] == max(s["accuracy"] for s in scores)


def test_mse_distils_a_regression_output(tmp_path: Path) -> None:
    teacher, student = _mlp(softmax=False, seed=1), _mlp(softmax=False, seed=2)
    data = _dataset(student, _npz(tmp_path / "d.npz", 64))
    export_logits(teacher, data, tmp_path / "t.npy")
    options = build_options(
        get_pass("distill"), {"epochs": 20, "lr": 1e-2, "loss": "mse", "batch_size": 16}
    )
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"))
    result = get_pass("distill")(options).run(student, ctx)
    holdout = result.stats["holdout"]
    assert holdout[result.stats["best_epoch"]]["loss"] < 0.5 * holdout[0]["loss"]


def test_a_fixed_batch_model_trains_on_whole_batches(tmp_path: Path) -> None:
    teacher = _mlp(softmax=False, seed=1)
    proto = _mlp(softmax=False, seed=2).to_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    student = Model(ir=ir.from_proto(proto))
    data = _dataset(student, _npz(tmp_path / "d.npz", 24))
    export_logits(teacher, data, tmp_path / "t.npy", batch_size=4)
    options = build_options(
        get_pass("distill"), {"epochs": 2, "lr": 1e-2, "holdout": 0.2, "batch_size": 32}
    )
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"))
    result = get_pass("distill")(options).run(student, ctx)
    # 24 samples: 4 held out (one whole batch), 20 trained on in steps of exactly 4
    assert result.stats["holdout_samples"] == 4
    assert result.modified and result.stats["steps"] == 2 * 5


# ---------------------------------------------------------------------------- pieces


def test_learning_rate_warms_up_then_follows_a_cosine() -> None:
    lr = LearningRate(lr=1.0, total=10, warmup_steps=2)
    values = [lr.at(i) for i in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
    assert LearningRate(lr=0.3, total=5, kind="constant").at(4) == 0.3


@pytest.mark.parametrize("buffer", [1, 7, 1000])
def test_minibatches_cover_the_training_samples_once_per_epoch(tmp_path: Path, buffer: int) -> None:
    student = _mlp(softmax=False)
    data = _dataset(student, _npz(tmp_path / "d.npz", 50))
    held = np.zeros(50, bool)
    held[[3, 17, 40]] = True
    rng = np.random.default_rng(0)
    x = np.load(tmp_path / "d.npz")["x"]
    batches = list(_minibatches(data, held, 8, buffer, rng, drop_last=False))
    seen = np.concatenate([b.indices for b in batches])
    assert sorted(seen.tolist()) == [i for i in range(50) if not held[i]]
    assert all(b.size == 8 for b in batches[:-1])
    for b in batches:
        np.testing.assert_array_equal(b.feeds["x"], x[b.indices])
    if buffer > 8:
        assert seen.tolist() != sorted(seen.tolist())  # shuffled
    dropped = list(_minibatches(data, held, 8, buffer, rng, drop_last=True))
    assert all(b.size == 8 for b in dropped)


# ---------------------------------------------------------------------------- command line


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_export_logits_then_distill(tmp_path: Path) -> None:
    model, _, _ = _digits_pruned(tmp_path / "work")
    from graphopt.model import save_model

    pruned = save_model(model, tmp_path / "pruned.onnx").path
    digest = _digest(pruned)
    runner = CliRunner()
    logits = tmp_path / "logits.npy"
    result = runner.invoke(
        main,
        ["export-logits", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz"),
         "-o", str(logits)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.load(logits).shape == (256, 10)
    out = tmp_path / "distilled.onnx"
    result = runner.invoke(
        main,
        ["distill", str(pruned), "--data", str(DIGITS / "calib.npz"), "--teacher-logits",
         str(logits), "--val-data", str(DIGITS / "val.npz"), "--epochs", "5", "--lr", "1e-3",
         "--device", "cpu", "-o", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _digest(pruned) == digest
    onnx.checker.check_model(onnx.load(out))
    assert (tmp_path / "distilled.report.json").exists()
    val = _dataset(model, DIGITS / "val.npz")
    assert _accuracy(out, val) > _accuracy(pruned, val) + 0.3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs a teacher"),
        (["--teacher", "a.onnx", "--teacher-logits", "b.npy"], "not both"),
        (["--teacher-logits", "missing.npy"], "do not exist"),
        (["--teacher-logits", "t.npy", "--epochs", "zero"], "must be int"),
        (["--teacher-logits", "t.npy", "--lr", "-1"], "outside its range"),
    ],
)
def test_cli_distill_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    np.save(tmp_path / "t.npy", np.zeros((256, 10), np.float32))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(
        main,
        ["distill", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz"),
         "-o", str(out), *[str(tmp_path / e) if e.endswith((".npy", ".onnx")) else e
                           for e in extra]],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not out.exists()


def _tail_model(nodes: list, out_shape: list) -> Model:
    """x[N,4,6] -> MatMul w[6,6] -> z, then `nodes` from z to y."""
    w = numpy_helper.from_array(np.eye(6, dtype=np.float32), "w")
    extra = [
        numpy_helper.from_array(np.array([-1, 4, 6], np.int64), "back"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
    ]
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), *nodes],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [w, *extra],
    )
    return Model(ir=ir.from_proto(proto))


def test_logits_view_looks_through_qdq_and_the_opset_12_softmax_form() -> None:
    quantized = _tail_model(
        [
            helper.make_node("Softmax", ["z"], ["p"], axis=-1),
            helper.make_node("QuantizeLinear", ["p", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]),
        ],
        ["N", 4, 6],
    )
    view = logits_view(quantized, "y")
    assert (view.tensor, view.axis) == ("z", 2)
    flattened = _tail_model(
        [
            helper.make_node("Flatten", ["z"], ["f"], axis=2),
            helper.make_node("Softmax", ["f"], ["p"], axis=-1),
            helper.make_node("Reshape", ["p", "back"], ["y"]),
        ],
        ["N", 4, 6],
    )
    view = logits_view(flattened, "y")
    assert (view.tensor, view.axis) == ("z", 2)
    joint = _tail_model(  # a softmax over axes 1 and 2 together has no single class axis
        [
            helper.make_node("Flatten", ["z"], ["f"], axis=1),
            helper.make_node("Softmax", ["f"], ["p"], axis=-1),
            helper.make_node("Reshape", ["p", "back"], ["y"]),
        ],
        ["N", 4, 6],
    )
    view = logits_view(joint, "y")
    assert (view.tensor, view.axis) == ("y", None)


def test_identity_shared_weights_come_back_untied(tmp_path: Path) -> None:
    """torch.onnx.export ties identical initializers behind Identity nodes; after distill the
    two layers have their own trained biases (the Identity becomes an initializer)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Identity", ["b"], ["b_copy"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["z"]),
        helper.make_node("Add", ["z", "b_copy"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    student = Model(ir=ir.from_proto(proto))
    x = rng.standard_normal((40, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.save(tmp_path / "t.npy", rng.standard_normal((40, 8)).astype(np.float32))
    data = _dataset(student, tmp_path / "d.npz")
    options = build_options(
        get_pass("distill"), {"epochs": 3, "lr": 1e-2, "holdout": 0.0, "batch_size": 8}
    )
    ctx = _ctx(tmp_path, data, teacher=TeacherSpec(logits=tmp_path / "t.npy"))
    assert get_pass("distill")(options).run(student, ctx).modified
    assert "Identity" not in [n.op_type for n in student.graph]
    first = student.graph.initializers["b"].const_value.numpy()
    second = student.graph.initializers["b_copy"].const_value.numpy()
    assert not np.allclose(first, second)
    create_session(student, device="cpu").run({"x": x})  # still runs

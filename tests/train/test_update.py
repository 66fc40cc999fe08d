"""The in-graph optimizer (graphopt/train/update.py): the same weights as the numpy optimizers
and as torch.optim over several steps, with pruning masks, weight decay, Nesterov momentum and
a learning rate that changes every step."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from graphopt.train import SGD, AdamW, Loss, Trainer
from tests.train.nets import mlp
from tests.train.test_session import _blobs, _feeds, _pruned_mlp

OPTIMIZERS = {
    "sgd": SGD(lr=0.1, momentum=0.0),
    "sgd-momentum-wd": SGD(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "adamw": AdamW(lr=0.02, weight_decay=0.0),
    "adamw-wd": AdamW(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
}
STEPS = 6


def _lr(base: float, step: int) -> float:
    return base * (1.0 + 0.5 * np.cos(step))  # changes every step, as a schedule does


def _trainer(optimizer, in_graph: bool, model=None) -> Trainer:
    return Trainer(
        model if model is not None else _pruned_mlp()[0],
        [Loss.cross_entropy("logits")],
        copy.deepcopy(optimizer),
        threads=1,
        optimizer_in_graph=in_graph,
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_graph_update_equals_numpy(name):
    x, labels = _blobs()
    base = OPTIMIZERS[name]
    graph_t, numpy_t = _trainer(base, True), _trainer(base, False)
    assert graph_t.update is not None and numpy_t.update is None
    _, keep = _pruned_mlp()
    for step in range(STEPS):
        for t in (graph_t, numpy_t):
            t.optimizer.lr = _lr(base.lr, step)
        a = graph_t.step(_feeds(x, labels)).loss
        b = numpy_t.step(_feeds(x, labels)).loss
        assert a == pytest.approx(b, rel=1e-5)
        for k, v in numpy_t.params.items():
            np.testing.assert_allclose(graph_t.params[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    assert np.all(graph_t.params["w1"][~keep] == 0.0)
    assert np.mean(graph_t.params["w1"][keep] != _pruned_mlp()[0].graph.initializers[
        "w1"].const_value.numpy()[keep]) > 0.5  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_graph_update_equals_torch(name):
    torch = pytest.importorskip("torch")
    x, labels = _blobs()
    base = OPTIMIZERS[name]
    trainer = _trainer(base, True)
    oracle = _trainer(SGD(lr=0.0, momentum=0.0), False)  # gradients at torch's weights
    params = {k: torch.tensor(v.copy()) for k, v in trainer.params.items()}
    for p in params.values():
        p.requires_grad_(True)
    if isinstance(base, SGD):
        opt = torch.optim.SGD(list(params.values()), lr=base.lr, momentum=base.momentum,
                              weight_decay=base.weight_decay, nesterov=base.nesterov)  # fmt: skip
    else:
        opt = torch.optim.AdamW(list(params.values()), lr=base.lr, betas=base.betas,
                                eps=base.eps, weight_decay=base.weight_decay)  # fmt: skip
    for step in range(STEPS):
        lr = _lr(base.lr, step)
        trainer.optimizer.lr = lr
        for group in opt.param_groups:
            group["lr"] = lr
        oracle.params = {k: p.detach().numpy().copy() for k, p in params.items()}
        _, grads, _ = oracle.gradients(_feeds(x, labels))  # masked
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
        trainer.step(_feeds(x, labels))
        for k, p in params.items():
            np.testing.assert_allclose(
                trainer.params[k], p.detach().numpy(), rtol=1e-4, atol=2e-6, err_msg=k
            )
    _, keep = _pruned_mlp()
    assert np.all(trainer.params["w1"][~keep] == 0.0)


def test_params_and_lr_can_be_set_between_steps():
    x, labels = _blobs()
    trainer = _trainer(AdamW(lr=0.02), True, model=mlp())
    saved = {k: v.copy() for k, v in trainer.params.items()}
    for _ in range(3):
        trainer.step(_feeds(x, labels))
    assert any(not np.array_equal(saved[k], v) for k, v in trainer.params.items())
    trainer.params = {k: v.copy() for k, v in saved.items()}  # as distill restores the best
    loss, _, _ = trainer.gradients(_feeds(x, labels))
    first = _trainer(AdamW(lr=0.02), True, model=mlp()).gradients(_feeds(x, labels))[0]
    assert loss == pytest.approx(first, rel=1e-6)
    trainer.optimizer.lr = 0.0
    before = {k: v.copy() for k, v in trainer.params.items()}
    trainer.step(_feeds(x, labels))
    for k, v in trainer.params.items():  # lr 0 and no weight decay: nothing moves
        np.testing.assert_array_equal(v, before[k])


def test_changing_the_optimizer_structure_rebuilds_the_update():
    x, labels = _blobs()
    trainer = _trainer(SGD(lr=0.1, momentum=0.0), True, model=mlp())
    trainer.step(_feeds(x, labels))
    trainer.optimizer.momentum = 0.9  # a momentum buffer now: another graph
    trainer.step(_feeds(x, labels))
    trainer.sync()  # the momentum buffers live on the session's device between steps
    assert trainer.update is not None and trainer.update.key == ("sgd", True, False, False)
    assert set(trainer.optimizer._buffers) == set(trainer.params)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_weight_decay_switched_on_mid_run_matches_numpy(kind):
    """Without weight decay the update graph has no decay nodes; turning it on rebuilds the
    graph, and the weights still follow the numpy optimizer step for step."""
    x, labels = _blobs()

    def make():
        return SGD(lr=0.1, momentum=0.9) if kind == "sgd" else AdamW(lr=0.01, weight_decay=0.0)

    in_graph, numpy_side = _trainer(make(), True, model=mlp()), _trainer(make(), False, model=mlp())
    plain = len(in_graph.update.proto.graph.node)
    for step in range(4):
        if step == 2:
            for trainer in (in_graph, numpy_side):
                trainer.optimizer.weight_decay = 0.05
        in_graph.step(_feeds(x, labels))
        numpy_side.step(_feeds(x, labels))
    assert in_graph.update.key[-1] is True
    assert len(in_graph.update.proto.graph.node) > plain
    for name, value in numpy_side.params.items():
        np.testing.assert_allclose(in_graph.params[name], value, rtol=1e-5, atol=1e-6)

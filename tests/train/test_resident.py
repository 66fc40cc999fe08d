"""Weights and optimizer state kept on the session's device between steps (IOBinding,
graphopt/train/resident.py), run here on the CPU: the same weights, state and losses as the
host-fed in-graph step, step for step, whatever the caller does with `params` in between."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from graphopt.train import SGD, AdamW, Loss, Trainer
from tests.train.nets import mlp
from tests.train.test_session import _blobs, _feeds, _pruned_mlp

OPTIMIZERS = {
    "sgd-momentum-wd": SGD(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adamw": AdamW(lr=0.02, weight_decay=0.0),
    "adamw-wd": AdamW(lr=0.02, betas=(0.8, 0.99), weight_decay=0.1),
}


def _pair(optimizer, model=None) -> tuple[Trainer, Trainer]:
    def make(bound: bool) -> Trainer:
        return Trainer(
            model if model is not None else _pruned_mlp()[0],
            [Loss.cross_entropy("logits")],
            copy.deepcopy(optimizer),
            threads=1,
            io_binding=bound,
        )

    return make(True), make(False)


def _same(a: Trainer, b: Trainer) -> None:
    for name, value in b.params.items():
        np.testing.assert_allclose(a.params[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bound_steps_equal_host_fed_steps(name):
    x, labels = _blobs()
    bound, host = _pair(OPTIMIZERS[name])
    assert bound.io_binding and not host.io_binding
    _, keep = _pruned_mlp()
    for step in range(5):
        for t in (bound, host):
            t.optimizer.lr = OPTIMIZERS[name].lr * (1 + 0.5 * np.cos(step))
        a, b = bound.step(_feeds(x, labels)).loss, host.step(_feeds(x, labels)).loss
        assert a == pytest.approx(b, rel=1e-6)
    _same(bound, host)
    assert np.all(bound.params["w1"][~keep] == 0.0)  # masks still hold
    # the optimizer state came back too
    slots = ("_m", "_v") if isinstance(bound.optimizer, AdamW) else ("_buffers",)
    for slot in slots:
        for key, value in getattr(host.optimizer, slot).items():
            np.testing.assert_allclose(getattr(bound.optimizer, slot)[key], value, rtol=1e-6)


def test_params_changed_between_steps_reach_the_device():
    """A caller that reads params, changes them in place or replaces the dict (the distill
    loop restores its best weights), then steps again."""
    x, labels = _blobs()
    bound, host = _pair(SGD(lr=0.1, momentum=0.9), model=mlp())
    for t in (bound, host):
        t.step(_feeds(x, labels))
        t.params["w1"][...] = 0.5  # in place
        t.step(_feeds(x, labels))
        saved = {k: v.copy() for k, v in t.params.items()}
        arrays, values = dict(saved), {k: v.copy() for k, v in saved.items()}
        t.step(_feeds(x, labels))
        t.params = saved  # replaced
        t.step(_feeds(x, labels))
        t.step(_feeds(x, labels))
        for name, array in arrays.items():  # the device never wrote into the caller's arrays
            np.testing.assert_array_equal(array, values[name])
    _same(bound, host)


def test_gradients_and_a_rebuilt_update_see_the_device_weights():
    x, labels = _blobs()
    bound, host = _pair(SGD(lr=0.1, momentum=0.0), model=mlp())
    for t in (bound, host):
        t.step(_feeds(x, labels))
        t.step(_feeds(x, labels))
    loss_a, grads_a, _ = bound.gradients(_feeds(x, labels))
    loss_b, grads_b, _ = host.gradients(_feeds(x, labels))
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, g in grads_b.items():
        np.testing.assert_allclose(grads_a[name], g, rtol=1e-5, atol=1e-7)
    for t in (bound, host):
        t.optimizer.momentum = 0.9  # another update graph, and a new binding
        t.step(_feeds(x, labels))
        t.step(_feeds(x, labels))
    _same(bound, host)


def test_trained_model_holds_the_device_weights():
    x, labels = _blobs()
    bound, host = _pair(AdamW(lr=0.05), model=mlp())
    for t in (bound, host):
        for _ in range(3):
            t.step(_feeds(x, labels))
    a, b = bound.trained_model(), host.trained_model()
    for name, init in b.graph.initializers.items():
        np.testing.assert_allclose(
            a.graph.initializers[name].const_value.numpy(), init.const_value.numpy(), rtol=1e-6
        )

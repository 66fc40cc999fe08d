"""Train the embedded sample model (a small CNN on scikit-learn's 8x8 digits) and export it.

Writes, next to this script:
    model.onnx  opset 17; input "image" float32 [N,1,8,8], output "logits" [N,10]; the
                Conv-BatchNormalization-ReLU blocks stay as separate nodes so that BN folding,
                pruning and quantization passes have something to do
    calib.npz   "image": calibration samples, normalized as in training
    val.npz     "image", "labels" (int64): the held-out validation samples

Run with a Python that has torch, onnx, onnxruntime, scikit-learn and numpy (torch is a
dev-only tool and not a dependency of graphopt):

    python models/digits/make_model.py

Everything is seeded, so a rerun on the same versions gives the same split and weights.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort  # noqa: TID251 - a dev script outside the package, like benchmarks/
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
VAL_SAMPLES = 360
CALIB_SAMPLES = 256
EPOCHS = 40
BATCH_SIZE = 64
OPSET = 17


class DigitsNet(nn.Module):
    """Three Conv-BN-ReLU blocks (16, 32, 32 channels; the third residual) and a 2-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)) + x)
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(self.dropout(x))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # CPU reductions then run in one fixed order


def split_data() -> tuple[dict[str, np.ndarray], float, float]:
    """Stratified train/calibration/validation split; normalization constants from train."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rest_x, val_x, rest_y, val_y = train_test_split(
        images, labels, test_size=VAL_SAMPLES, stratify=labels, random_state=SEED
    )
    train_x, calib_x, train_y, _ = train_test_split(
        rest_x, rest_y, test_size=CALIB_SAMPLES, stratify=rest_y, random_state=SEED
    )
    # Rounded so that the README's constants reproduce the data exactly.
    mean = round(float(train_x.mean()), 4)
    std = round(float(train_x.std()), 4)

    def norm(x: np.ndarray) -> np.ndarray:
        return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)

    data = {
        "train_x": norm(train_x),
        "train_y": train_y,
        "calib_x": norm(calib_x),
        "val_x": norm(val_x),
        "val_y": val_y,
    }
    return data, mean, std


def train(model: DigitsNet, x: np.ndarray, y: np.ndarray) -> None:
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for start in range(0, len(xs), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}/{EPOCHS}  train loss {total / len(xs):.4f}")


def export(model: DigitsNet, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(2, 1, 8, 8)
    # The TorchScript exporter folds BatchNorm into Conv in EVAL mode; PRESERVE keeps the
    # BatchNormalization nodes (with the module in eval mode they use the running stats).
    torch.onnx.export(
        model,
        (dummy,),
        os.fspath(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    proto = onnx.load(os.fspath(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    if ops.count("BatchNormalization") != 3:
        raise SystemExit(f"expected 3 BatchNormalization nodes in the export, got ops {ops}")
    print("exported ops:", " ".join(ops))


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args()
    seed_everything(SEED)
    data, mean, std = split_data()
    print(
        f"split: train {len(data['train_x'])}, calib {len(data['calib_x'])}, "
        f"val {len(data['val_x'])}; normalization x/16, then (x - {mean}) / {std}"
    )
    model = DigitsNet()
    train(model, data["train_x"], data["train_y"])
    with torch.no_grad():
        torch_acc = float(
            (
                model.eval()(torch.from_numpy(data["val_x"])).argmax(1).numpy() == data["val_y"]
            ).mean()
        )
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "model.onnx"
    export(model, model_path)
    np.savez_compressed(args.out / "calib.npz", image=data["calib_x"])
    np.savez_compressed(args.out / "val.npz", image=data["val_x"], labels=data["val_y"])
    acc = ort_accuracy(model_path, data["val_x"], data["val_y"])
    print(f"validation accuracy: PyTorch {torch_acc:.4f}, ONNX Runtime {acc:.4f}")
    print(f"({round(acc * len(data['val_y']))}/{len(data['val_y'])} correct)")


if __name__ == "__main__":
    main()

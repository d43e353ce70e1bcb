"""Train the two bundled sample models on scikit-learn's digits and write them with their data.

    python scripts/build_samples.py [--out sample_checkpoints]

Deterministic (same tensors on every run; the zip files differ only in torch's random serialization id):
fixed seeds, CPU, one thread, shuffles from a seeded generator.
load_digits() ships inside scikit-learn, so nothing is downloaded. Writes, into --out:
digits_mlp.pt, digits_cnn.pt (perdiag checkpoints) and digits_{mlp,cnn}_{train,val}.pt
((inputs, targets) tuples: MLP inputs (n, 64) float32, CNN inputs (n, 1, 8, 8) float32, int64 targets).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from perdiag.checkpoints import save_checkpoint
from perdiag.files import atomic_path
from perdiag.models import DigitsCNN, DigitsMLP

SEED = 0
TARGET_ACCURACY = 0.95
MAX_EPOCHS = 60


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels scaled to [0, 1] as (n, 64) float32, int64 labels; stratified 80/20 split, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=digits.target, random_state=SEED
    )
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, int]:
    """Adam, batch 64, until validation accuracy reaches TARGET_ACCURACY (at least 5 epochs)."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    val_accuracy = 0.0
    for epoch in range(1, MAX_EPOCHS + 1):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
        val_accuracy = accuracy(model, x_val, y_val)
        if epoch >= 5 and val_accuracy >= TARGET_ACCURACY:
            break
    return val_accuracy, epoch


def save_data(path: Path, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save((inputs.contiguous().clone(), targets.clone()), handle)


def build(out: Path) -> dict[str, float]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_val, y_val = digits_split()
    specs = {
        "mlp": (DigitsMLP, {"in_features": 64, "hidden": [64, 64], "n_classes": 10, "activation": "relu"}, [64]),
        "cnn": (DigitsCNN, {"channels": [16, 32], "n_classes": 10, "activation": "relu"}, [1, 8, 8]),
    }
    accuracies = {}
    for name, (cls, kwargs, input_shape) in specs.items():
        torch.manual_seed(SEED)
        model = cls(**kwargs)
        shape = (-1, *input_shape)
        train_x, val_x = x_train.reshape(shape), x_val.reshape(shape)
        val_accuracy, epochs = train(model, train_x, y_train, val_x, y_val)
        accuracies[name] = val_accuracy
        stem = f"digits_{name}"
        save_data(out / f"{stem}_train.pt", train_x, y_train)
        save_data(out / f"{stem}_val.pt", val_x, y_val)
        save_checkpoint(
            out / f"{stem}.pt",
            model,
            arch=f"perdiag.models:{cls.__name__}",
            arch_kwargs=kwargs,
            metadata={
                "input_shape": input_shape,
                "task": "classification",
                "class_names": [str(d) for d in range(10)],
                "sample_data": {"train": f"{stem}_train.pt", "val": f"{stem}_val.pt"},
                "description": (
                    f"{cls.__name__} trained on scikit-learn digits (pixels / 16, stratified 80/20 split, seed {SEED}), "
                    f"Adam lr 1e-3, {epochs} epochs; validation accuracy {val_accuracy:.4f}"
                ),
            },
            extra={"metrics": {"val_accuracy": val_accuracy}, "epoch": epochs},
        )
        print(f"{stem}: {epochs} epochs, val accuracy {val_accuracy:.4f}")
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "sample_checkpoints")
    args = parser.parse_args()
    build(args.out)


if __name__ == "__main__":
    main()

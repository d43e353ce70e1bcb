"""One test per user-facing `perdiag train` failure: exit code 2, one clear line, no traceback, and an
existing output checkpoint left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perdiag.checkpoints import load_model
from perdiag.cli import main
from perdiag.models import DigitsMLP

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "sample_checkpoints" / "digits_mlp.pt"
SENTINEL = b"an earlier run's checkpoint"


pytestmark = pytest.mark.usefixtures("one_thread")


def fails(tmp_path: Path, capsys, args: list[str], phrase: str) -> str:
    """Run ``perdiag train ... --out OUT`` where OUT already exists; expect exit 2 and ``phrase``."""
    out = tmp_path / "out.pt"
    if not out.exists():
        out.write_bytes(SENTINEL)
    with pytest.raises(SystemExit) as done:
        main(["train", *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert phrase in err, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert out.read_bytes() == SENTINEL
    return err


def save_data(path: Path, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> Path:
    torch.save(inputs if targets is None else (inputs, targets), path)
    return path


def test_negative_weight(tmp_path, capsys):
    fails(tmp_path, capsys, [str(MLP), "--per-weight", "-1e-4"], "--per-weight must be a finite number >= 0")


def test_zero_epochs(tmp_path, capsys):
    fails(tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--epochs", "0"], "--epochs must be at least 1")


def test_missing_weight(tmp_path, capsys):
    fails(tmp_path, capsys, [str(MLP)], "pass --per-weight LAMBDA")


def test_label_outside_the_model_classes(tmp_path, capsys):
    labels = torch.arange(20) % 10
    labels[7] = 12
    data = save_data(tmp_path / "d.pt", torch.rand(20, 64), labels)
    message = fails(tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--data", str(data)], "label 12")
    assert "10 outputs" in message and "0..9" in message


def test_float_labels_for_classification(tmp_path, capsys):
    data = save_data(tmp_path / "d.pt", torch.rand(20, 64), torch.rand(20))
    fails(tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--data", str(data)], "integer class labels")


def test_regression_target_shape_mismatch(tmp_path, capsys):
    data = save_data(tmp_path / "d.pt", torch.rand(20, 64), torch.rand(20, 3))
    fails(
        tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--task", "regression", "--data", str(data)],
        "regression targets of d.pt have shape (3,) per example but the model outputs (10) per example",
    )


def test_data_without_targets(tmp_path, capsys):
    data = save_data(tmp_path / "x.pt", torch.rand(20, 64))
    fails(tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--data", str(data)], "x.pt has no targets")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_model_cannot_be_written_back(tmp_path, capsys):
    scripted = torch.jit.script(DigitsMLP())
    scripted.save(str(tmp_path / "scripted.pt"))
    data = ROOT / "sample_checkpoints" / "digits_mlp_train.pt"
    fails(tmp_path, capsys, [str(tmp_path / "scripted.pt"), "--per-weight", "1e-4", "--data", str(data)], "TorchScript")


def test_diverging_run_writes_nothing(tmp_path, capsys):
    fails(
        tmp_path, capsys,
        [str(MLP), "--per-weight", "0", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "1", "--batch-size", "512"],
        "the training loss became nan",
    )


def test_resume_of_a_checkpoint_that_is_not_a_run(tmp_path, capsys):
    fails(tmp_path, capsys, ["--resume", str(MLP)], "was not written by perdiag train")


def test_resume_with_a_changed_option(tmp_path, capsys):
    run = tmp_path / "run.pt"
    with pytest.raises(SystemExit) as done:
        main(["train", str(MLP), "--per-weight", "0.01", "--epochs", "1", "--batch-size", "512", "--out", str(run), "-q"])
    assert done.value.code in (0, None)
    before = run.read_bytes()
    fails(tmp_path, capsys, ["--resume", str(run), "--epochs", "2", "--lr", "0.1"], "--lr 0.1 differs from the run being resumed")
    assert run.read_bytes() == before and load_model(run).checkpoint["epoch"] == 1


def test_output_would_replace_the_input(tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes(MLP.read_bytes())
    with pytest.raises(SystemExit) as done:
        main(["train", str(model), "--per-weight", "1e-4", "--out", str(model), "-q"])
    assert done.value.code == 2 and "is the input checkpoint" in capsys.readouterr().err
    assert model.read_bytes() == MLP.read_bytes()


def test_column_shaped_labels_say_to_drop_the_axis(tmp_path, capsys):
    data = save_data(tmp_path / "col.pt", torch.zeros(20, 64), torch.zeros(20, 1, dtype=torch.long))
    fails(tmp_path, capsys, [str(MLP), "--per-weight", "1e-4", "--data", str(data), "--val-data", str(data)], "y.squeeze(-1)")

"""`perdiag inspect` end to end on real files: the sample checkpoints and third-party models."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from tiny_models import SequenceClassifier, TokenEncoder

from perdiag.checkpoints import load_model
from perdiag.report import REQUIRED_COLUMNS


def test_sample_cnn_with_no_other_argument(run_cli, samples, tmp_path):
    csv, js = tmp_path / "cnn.csv", tmp_path / "cnn.json"
    code, out, err = run_cli("inspect", samples / "digits_cnn.pt", "--csv", csv, "--json", js)
    assert code == 0, err
    table = pd.read_csv(csv)
    assert list(table.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert "features.conv1" in out and "PER reference" in out
    # The val split holds 360 digits; conv1 sees 8x8 positions each -> 360 * 64 samples of 16 units.
    conv1 = table.set_index("layer").loc["features.conv1"]
    assert conv1["n_samples"] == 360 * 64 and conv1["n_units"] == 16
    assert (table["per"] >= table["sw1"]).all()
    assert np.allclose(table["per_minus_sw1"], table["per"] - table["sw1"])
    document = json.loads(js.read_text())
    assert document["settings"]["n_projections"] == 256
    assert document["settings"]["loading"] == "perdiag"
    assert [row["layer"] for row in document["layers"]] == list(table["layer"])


def test_reported_moments_equal_a_manual_forward(run_cli, samples, tmp_path):
    csv = tmp_path / "mlp.csv"
    code, _, err = run_cli("inspect", samples / "digits_mlp.pt", "--csv", csv, "--batch-size", "50")
    assert code == 0, err
    table = pd.read_csv(csv).set_index("layer")
    model = load_model(samples / "digits_mlp.pt").model.eval()
    inputs, _ = torch.load(samples / "digits_mlp_val.pt", weights_only=True)
    with torch.no_grad():
        hidden = model.body.act1(model.body.fc1(inputs)).double().numpy().ravel()
    row = table.loc["body.act1"]
    assert row["mean"] == pytest.approx(hidden.mean(), rel=1e-9)
    assert row["std"] == pytest.approx(hidden.std(), rel=1e-9)
    assert row["skew"] == pytest.approx(stats.skew(hidden), rel=1e-6)
    assert row["kurtosis"] == pytest.approx(stats.kurtosis(hidden), rel=1e-6)
    assert row["frac_zero"] == pytest.approx(np.mean(hidden == 0), abs=1e-12)
    assert row["max"] == pytest.approx(hidden.max(), rel=1e-7)
    # 360 rows < the reservoir: the distances use every row, so they are exact for this data.
    from perdiag import wasserstein_to_normal

    assert row["w1"] == pytest.approx(wasserstein_to_normal(hidden), rel=1e-9)


def test_list_layers(run_cli, samples):
    code, out, _ = run_cli("inspect", samples / "digits_cnn.pt", "--list-layers")
    assert code == 0
    for name in ("features.conv1", "classifier.head", "Conv2d", "(256, 16, 8, 8)"):
        assert name in out
    # A container counts its children's parameters: conv1 (16*9+16) + conv2 (32*16*9+32).
    features = next(line for line in out.splitlines() if " features " in line and "Sequential" in line)
    assert "4800" in features


def test_layer_and_type_selection(run_cli, samples, tmp_path):
    csv = tmp_path / "t.csv"
    code, _, err = run_cli("inspect", samples / "digits_cnn.pt", "--types", "Conv2d,Linear", "--layers", "features.*", "--csv", csv)
    assert code == 0, err
    assert list(pd.read_csv(csv)["layer"]) == ["features.conv1", "features.conv2"]


def test_random_inputs_use_the_checkpoint_input_shape(run_cli, samples, tmp_path):
    csv = tmp_path / "r.csv"
    code, _, err = run_cli("inspect", samples / "digits_cnn.pt", "--random", "64", "--csv", csv, "--max-samples", "100")
    assert code == 0, err
    table = pd.read_csv(csv)
    assert table.loc[0, "n_samples"] == 64 * 64
    assert (table["reservoir_size"] <= 100).all()


def test_lstm_state_dict_from_an_installed_package(run_cli, tmp_path):
    lstm = torch.nn.LSTM(4, 6, batch_first=True)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "model_state_dict": lstm.state_dict()}, tmp_path / "lstm.pth")
    torch.save(torch.randn(20, 5, 4), tmp_path / "seq.pt")
    csv = tmp_path / "lstm.csv"
    code, _, err = run_cli(
        "inspect", tmp_path / "lstm.pth", "--arch", "torch.nn:LSTM",
        "--arch-kwargs", '{"input_size": 4, "hidden_size": 6, "batch_first": true}',
        "--data", tmp_path / "seq.pt", "--csv", csv,
    )
    assert code == 0, err
    row = pd.read_csv(csv).iloc[0]
    # (B, T, D) output -> B*T samples of D units.
    assert (row["layer"], row["n_samples"], row["n_units"]) == ("<model>", 100, 6) or (row["n_samples"], row["n_units"]) == (100, 6)


def test_lstm_model_and_dataparallel_prefix(run_cli, tmp_path):
    model = SequenceClassifier()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "seq.pt")
    torch.save((torch.randn(12, 7, 4), torch.randint(0, 2, (12,))), tmp_path / "data.pt")
    csv = tmp_path / "seq.csv"
    code, _, err = run_cli(
        "inspect", tmp_path / "seq.pt", "--arch", "tiny_models:SequenceClassifier", "--data", tmp_path / "data.pt", "--csv", csv
    )
    assert code == 0, err
    table = pd.read_csv(csv).set_index("layer")
    assert table.loc["lstm", "n_samples"] == 12 * 7 and table.loc["lstm", "n_units"] == 8
    assert "module." in err  # the stripped prefix is reported


def test_transformer_encoder_with_token_ids_and_attention_mask(run_cli, tmp_path):
    torch.manual_seed(0)
    model = TokenEncoder()
    torch.save(model.state_dict(), tmp_path / "enc.bin")
    ids = torch.randint(0, 50, (10, 9))
    mask = torch.ones(10, 9, dtype=torch.bool)
    mask[:, 6:] = False
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "tokens.pt")
    csv = tmp_path / "enc.csv"
    code, _, err = run_cli(
        "inspect", tmp_path / "enc.bin", "--arch", "tiny_models:TokenEncoder", "--data", tmp_path / "tokens.pt", "--csv", csv
    )
    assert code == 0, err
    table = pd.read_csv(csv).set_index("layer")
    # Token-level layers: B*T samples of d_model units; the embedding of integer ids is captured as floats.
    assert table.loc["embed", "n_samples"] == 90 and table.loc["embed", "n_units"] == 16
    assert table.loc["head", "n_samples"] == 10 and table.loc["head", "n_units"] == 3
    assert any(name.startswith("encoder.layers.0") for name in table.index)
    # Eval mode everywhere: dropout off, so two runs agree exactly.
    csv2 = tmp_path / "enc2.csv"
    run_cli("inspect", tmp_path / "enc.bin", "--arch", "tiny_models:TokenEncoder", "--data", tmp_path / "tokens.pt", "--csv", csv2)
    pd.testing.assert_frame_equal(pd.read_csv(csv), pd.read_csv(csv2))


def test_torchscript_reports_the_output_and_says_why(run_cli, samples, tmp_path):
    model = load_model(samples / "digits_mlp.pt").model.eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    csv = tmp_path / "ts.csv"
    code, out, err = run_cli("inspect", tmp_path / "scripted.pt", "--data", samples / "digits_mlp_val.pt", "--csv", csv)
    assert code == 0, err
    table = pd.read_csv(csv)
    assert list(table["layer"]) == ["<output>"] and table.loc[0, "n_units"] == 10
    assert "TorchScript" in out and "hooks" in out


def test_half_precision_checkpoint(run_cli, samples, tmp_path):
    from perdiag.checkpoints import save_checkpoint

    loaded = load_model(samples / "digits_mlp.pt")
    save_checkpoint(tmp_path / "half.pt", loaded.model.to(torch.bfloat16), arch=loaded.arch,
                    arch_kwargs=loaded.arch_kwargs, metadata={"input_shape": [64]})
    csv = tmp_path / "half.csv"
    code, _, err = run_cli("inspect", tmp_path / "half.pt", "--data", samples / "digits_mlp_val.pt", "--csv", csv)
    assert code == 0, err
    table = pd.read_csv(csv)
    assert table["sw1"].map(math.isfinite).all()


def test_real_entry_point_exit_codes():
    """The installed console entry point, as a user runs it: errors are one line, exit 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "perdiag", "inspect", "no/such/model.pt"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no/such/model.pt" in result.stderr


def test_no_strict_notes_reach_the_json(run_cli, samples, tmp_path):
    loaded = load_model(samples / "digits_mlp.pt")
    state = loaded.model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "loose.pt")
    js = tmp_path / "loose.json"
    code, _, err = run_cli(
        "inspect", tmp_path / "loose.pt", "--arch", loaded.arch, "--arch-kwargs", json.dumps(loaded.arch_kwargs),
        "--no-strict", "--data", samples / "digits_mlp_val.pt", "--json", js, "-q",
    )
    assert code == 0, err
    notes = " ".join(json.loads(js.read_text())["notes"])
    assert "extra.weight" in notes and "head.bias" in notes  # a -q run still records what loading skipped

"""Every user error `perdiag compare` guards against: one line naming the problem, exit 2, no traceback."""

from __future__ import annotations

import pytest


def assert_user_error(result, *phrases) -> str:
    code, out, err = result
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0].rstrip()), err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def test_models_without_a_common_layer(run_cli, samples):
    # The MLP flattens its input, so the CNN's (n, 1, 8, 8) digits run through both models.
    message = assert_user_error(
        run_cli("compare", samples / "digits_mlp.pt", samples / "digits_cnn.pt", "--data", samples / "digits_cnn_val.pt"),
        "A (digits_mlp.pt) and B (digits_cnn.pt) have no layer in common",
        "A has body.fc1", "B has features.conv1",
    )
    assert "--layers" in message


@pytest.mark.parametrize(
    ("models", "data", "side"),
    [
        (("digits_mlp.pt", "digits_cnn.pt"), ("--data", "digits_mlp_val.pt"), "B (digits_cnn.pt)"),
        (("digits_cnn.pt", "digits_mlp.pt"), ("--data", "digits_mlp_val.pt"), "A (digits_cnn.pt)"),
        (("digits_cnn.pt",), ("--data", "digits_cnn_val.pt", "--data2", "digits_mlp_val.pt"), "B (digits_mlp_val.pt)"),
    ],
    ids=["data-does-not-fit-model-b", "data-does-not-fit-model-a", "data2-does-not-fit-the-model"],
)
def test_mismatched_data_names_the_side_and_the_layer(run_cli, samples, models, data, side):
    args = [samples / name for name in models]
    args += [samples / part if part.endswith(".pt") else part for part in data]
    assert_user_error(run_cli("compare", *args), f"{side}: layer features.conv1 (Conv2d) rejected its input", "(batch, 1, H, W)")


def test_data2_with_two_models(run_cli, samples):
    assert_user_error(
        run_cli("compare", samples / "digits_mlp.pt", samples / "digits_mlp.pt", "--data2", samples / "digits_mlp_val.pt"),
        "--data2 is for one model on two datasets", "two models both see --data",
    )


def test_one_model_without_data2(run_cli, samples):
    assert_user_error(run_cli("compare", samples / "digits_mlp.pt"), "nothing to compare", "--data2")


def test_missing_second_model(run_cli, samples, tmp_path):
    assert_user_error(run_cli("compare", samples / "digits_mlp.pt", tmp_path / "after.pt"), "after.pt", "not found")


def test_missing_second_dataset(run_cli, samples, tmp_path):
    assert_user_error(
        run_cli("compare", samples / "digits_mlp.pt", "--data2", tmp_path / "test_split.pt"), "test_split.pt"
    )


def test_unwritable_output_fails_before_any_work(run_cli, samples, tmp_path):
    (tmp_path / "a_file").write_text("x")
    message = assert_user_error(
        run_cli("compare", samples / "digits_mlp.pt", samples / "digits_mlp.pt", "--csv", tmp_path / "a_file" / "out.csv"),
        "--csv",
    )
    assert "not a folder" in message

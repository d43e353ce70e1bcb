"""Every user error `perdiag inspect` guards against: one line, exit 2, no traceback, nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def assert_user_error(result, *phrases):
    code, out, err = result
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().startswith("error:") or "error:" in err
    for phrase in phrases:
        assert phrase in err, err


def test_missing_model_file(run_cli, tmp_path):
    assert_user_error(run_cli("inspect", tmp_path / "absent.pt"), "absent.pt")


def test_file_that_is_not_a_checkpoint(run_cli, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    assert_user_error(run_cli("inspect", tmp_path / "notes.pt"), "notes.pt")


def test_pickled_module_needs_the_opt_in_flag(run_cli, tmp_path, samples):
    torch.save(torch.nn.Linear(64, 3), tmp_path / "pickled.pt")
    assert_user_error(run_cli("inspect", tmp_path / "pickled.pt", "--data", samples / "digits_mlp_val.pt"), "--trust-checkpoint")
    code, out, err = run_cli("inspect", tmp_path / "pickled.pt", "--trust-checkpoint", "--data", samples / "digits_mlp_val.pt")
    assert code == 0, err


def test_state_dict_without_arch(run_cli, tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "sd.pt")
    assert_user_error(run_cli("inspect", tmp_path / "sd.pt"), "--arch")


def test_bad_arch_kwargs_json(run_cli, tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "sd.pt")
    assert_user_error(run_cli("inspect", tmp_path / "sd.pt", "--arch", "torch.nn:Linear", "--arch-kwargs", "{in_features: 3"), "--arch-kwargs")


def test_input_shape_mismatch_names_the_layer_and_expected_shape(run_cli, samples):
    assert_user_error(
        run_cli("inspect", samples / "digits_cnn.pt", "--data", samples / "digits_mlp_val.pt"),
        "features.conv1", "Conv2d", "(batch, 1, H, W)",
    )


def test_no_matching_layers(run_cli, samples):
    assert_user_error(run_cli("inspect", samples / "digits_cnn.pt", "--layers", "nothing.like.this*"), "--list-layers")


def test_random_inputs_need_a_shape(run_cli, tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "sd.pt")
    assert_user_error(
        run_cli("inspect", tmp_path / "sd.pt", "--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 3, "out_features": 3}', "--random", "8"),
        "--input-shape",
    )


def test_no_data_at_all(run_cli, tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "sd.pt")
    assert_user_error(
        run_cli("inspect", tmp_path / "sd.pt", "--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 3, "out_features": 3}'),
        "--data",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_cuda_requested_without_cuda(run_cli, samples):
    assert_user_error(run_cli("inspect", samples / "digits_mlp.pt", "--device", "cuda"), "--device cpu")


def test_unwritable_output_fails_before_any_work(run_cli, samples, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(run_cli("inspect", samples / "digits_mlp.pt", "--csv", blocker / "out.csv"), "--csv", "not a folder")
    assert_user_error(run_cli("inspect", samples / "digits_mlp.pt", "--plots", blocker), "--plots")


def test_failed_run_leaves_existing_outputs_untouched_and_no_temporary_files(run_cli, samples, tmp_path):
    csv = tmp_path / "report.csv"
    csv.write_text("previous results\n")
    code, _, _ = run_cli("inspect", samples / "digits_cnn.pt", "--data", samples / "digits_mlp_val.pt", "--csv", csv)
    assert code == 2
    assert csv.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


def test_debug_shows_the_traceback(run_cli, tmp_path):
    code, _, err = run_cli("inspect", tmp_path / "absent.pt", "--debug")
    assert code == 2 and "Traceback" in err


def test_user_errors_are_printed_once_under_torchrun(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli("inspect", tmp_path / "absent.pt")
    assert code == 2 and err == ""
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli("inspect", tmp_path / "absent.pt")
    assert code == 2 and "absent.pt" in err


def test_special_file_systems_are_caught_before_any_work(run_cli, samples):
    # Permission bits pass for root; /proc refuses new files all the same.
    assert_user_error(run_cli("inspect", samples / "digits_mlp.pt", "--html", "/proc/report.html"), "--html", "/proc")


def test_usage_errors_are_one_line_naming_help(run_cli, samples):
    code, _, err = run_cli("inspect", samples / "digits_mlp.pt", "--batch-size", "abc")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size" in err and "perdiag inspect --help" in err
    code, _, err = run_cli("train", samples / "digits_mlp.pt", "--output", "x.pt")
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1


def test_version(run_cli):
    from perdiag import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out


@pytest.mark.parametrize("command", [["inspect"], ["train", "--per-weight", "1"]])
def test_misspelt_layout_is_refused_before_anything_is_loaded(run_cli, tmp_path, command):
    # The model path does not exist: the layout must be what is reported, so nothing was loaded first.
    code, out, err = run_cli(*command, tmp_path / "absent.pt", "--layout", "channel_first")
    assert_user_error((code, out, err), "--layout", "channels_first")
    assert "absent.pt" not in err


def test_layout_choices_are_the_layout_rule_names():
    from perdiag.cli import Layout
    from perdiag.layout import LAYOUTS

    assert tuple(choice.value for choice in Layout) == LAYOUTS


def test_integer_pixels_for_a_float_model_say_to_save_float32(run_cli, tmp_path, samples):
    np.save(tmp_path / "pixels.npy", np.arange(20 * 64, dtype=np.int64).reshape(20, 64) % 16)
    assert_user_error(
        run_cli("inspect", samples / "digits_mlp.pt", "--data", tmp_path / "pixels.npy"),
        "body.fc1 (Linear)", "int64", "save the inputs as float32",
    )


def test_conv_input_of_the_wrong_rank_names_the_rank(run_cli, samples):
    code, out, err = run_cli("inspect", samples / "digits_cnn.pt", "--random", "8", "--input-shape", "1,8")
    assert_user_error((code, out, err), "features.conv1 (Conv2d)", "(8, 1, 8)", "a 4-D (batch, 1, H, W) input")


def test_unknown_plot_format_is_refused_before_the_run(run_cli, tmp_path):
    # It once surfaced as an internal error after the whole computation.
    code, out, err = run_cli("inspect", tmp_path / "absent.pt", "--plot-format", "bmp", "--plots", tmp_path / "p")
    assert_user_error((code, out, err), "--plot-format", "'png', 'svg', 'pdf'")
    assert "Value error" not in err and not (tmp_path / "p").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in favour of torch.export
def test_torchscript_refuses_layer_selection_and_list_layers(run_cli, samples, tmp_path):
    from perdiag.checkpoints import load_model

    torch.jit.save(torch.jit.script(load_model(samples / "digits_mlp.pt").model.eval()), tmp_path / "scripted.pt")
    data = ("--data", samples / "digits_mlp_val.pt")
    # --types used to be ignored (exit 0, the output only) and --list-layers was an internal error.
    assert_user_error(run_cli("inspect", tmp_path / "scripted.pt", *data, "--types", "Linear"), "TorchScript", "--types")
    assert_user_error(run_cli("inspect", tmp_path / "scripted.pt", *data, "--list-layers"), "--list-layers", "TorchScript")


def test_data_entries_the_forward_cannot_take(run_cli, samples, tmp_path):
    # Unknown dict/.npz names become keyword arguments: forward(x) got 'images' and was an internal error.
    np.savez(tmp_path / "named.npz", images=np.zeros((8, 64), dtype=np.float32), cls=np.zeros(8, dtype=np.int64))
    assert_user_error(
        run_cli("inspect", samples / "digits_mlp.pt", "--data", tmp_path / "named.npz"),
        "forward(x) cannot take the data's inputs", "images", "rename them",
    )


def test_label_column_read_as_a_feature_suggests_target_column(run_cli, samples, tmp_path):
    np.savetxt(tmp_path / "with_labels.csv", np.c_[np.zeros((6, 64)), np.arange(6)], delimiter=",")
    assert_user_error(
        run_cli("inspect", samples / "digits_mlp.pt", "--data", tmp_path / "with_labels.csv"),
        "(6, 65)", "one input column too many", "--target-column",
    )


def test_input_shape_typo_is_refused_not_shortened(run_cli, samples):
    # "1,x,8" once read as (1, 8).
    assert_user_error(run_cli("inspect", samples / "digits_cnn.pt", "--random", "4", "--input-shape", "1,x,8"), "'1,x,8'")

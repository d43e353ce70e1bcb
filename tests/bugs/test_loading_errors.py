"""One test per user-facing loading failure: each is a PerdiagError with a one-line, actionable message."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from perdiag.checkpoints import build_model, import_callable, load_model
from perdiag.data import load_examples
from perdiag.errors import PerdiagError
from perdiag.models import DigitsMLP

MLP = "perdiag.models:DigitsMLP"


def raises(phrase: str, func, *args, **kwargs) -> str:
    with pytest.raises(PerdiagError) as err:
        func(*args, **kwargs)
    message = str(err.value)
    assert phrase in message, message
    assert "\n" not in message, message
    return message


class Pickled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


def test_missing_checkpoint(tmp_path):
    raises("checkpoint not found", load_model, tmp_path / "nope.pt")


def test_unknown_checkpoint_extension(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    raises(".safetensors", load_model, tmp_path / "m.onnx")


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    raises("cannot read", load_model, tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    raises("cannot read", load_model, tmp_path / "empty.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    raises("not a valid safetensors", load_model, tmp_path / "bad.safetensors")


def test_pickled_module_without_trust(tmp_path):
    torch.save(Pickled(), tmp_path / "whole.pt")
    message = raises("--trust-checkpoint", load_model, tmp_path / "whole.pt")
    assert "arbitrary code" in message and "trusted source" in message


@pytest.mark.filterwarnings("ignore:BuiltinImporter.module_repr:DeprecationWarning")  # raised while unpickling
def test_trusted_pickle_of_a_script_class_says_to_save_a_state_dict(tmp_path):
    # A model class defined in the training script itself is pickled as __main__.Net.
    script = tmp_path / "train_script.py"
    script.write_text(
        "import sys, torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
        "torch.save(Net(), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, str(script), str(tmp_path / "script.pt")], check=True)
    message = raises("__main__", load_model, tmp_path / "script.pt", trust_checkpoint=True)
    assert "state_dict()" in message and "--arch" in message and "PYTHONPATH" not in message


def test_trusted_pickle_that_is_not_a_module(tmp_path):
    torch.save({"thing": Pickled, "n": 1}, tmp_path / "odd.pt")
    raises("no mapping of parameter names", load_model, tmp_path / "odd.pt", trust_checkpoint=True)


def test_state_dict_without_arch(tmp_path):
    torch.save(DigitsMLP().state_dict(), tmp_path / "sd.pt")
    message = raises("--arch package.module:callable", load_model, tmp_path / "sd.pt")
    assert "--arch-kwargs" in message


def test_strict_key_mismatch(tmp_path):
    torch.save(DigitsMLP().state_dict(), tmp_path / "sd.pt")
    raises("--no-strict", load_model, tmp_path / "sd.pt", arch=MLP, arch_kwargs={"hidden": [64, 64, 64]})


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
    torch.save(DigitsMLP().state_dict(), tmp_path / "sd.pt")
    message = raises("'body.fc1.weight'", load_model, tmp_path / "sd.pt", arch=MLP, arch_kwargs={"hidden": [32, 64]})
    assert "(64, 64)" in message and "(32, 64)" in message


def test_no_tensors_in_checkpoint(tmp_path):
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "meta.pt")
    raises("found no mapping of parameter names to tensors", load_model, tmp_path / "meta.pt", arch=MLP)


def test_bad_arch_paths():
    raises("package.module:callable", import_callable, "DigitsMLP")
    raises("cannot import module 'no_such_pkg.models'", import_callable, "no_such_pkg.models:Net")
    raises("has no attribute 'Nope'", import_callable, "perdiag.models:Nope")
    raises("not a class or function", import_callable, "perdiag.checkpoints:FORMAT_VERSION")


def test_arch_rejects_kwargs():
    message = raises("rejected keyword arguments", build_model, MLP, {"widht": 3})
    assert "perdiag.models:DigitsMLP" in message and "widht" in message


def test_arch_returns_non_module():
    raises("not a torch.nn.Module", build_model, "builtins:dict", {})


def test_cuda_unavailable(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    torch.save(DigitsMLP().state_dict(), tmp_path / "sd.pt")
    raises("CUDA is not available", load_model, tmp_path / "sd.pt", arch=MLP, device="cuda")


def test_newer_checkpoint_format(tmp_path):
    torch.save({"format": "perdiag-checkpoint", "format_version": 99, "arch": MLP, "state_dict": {}}, tmp_path / "f.pt")
    raises("upgrade perdiag", load_model, tmp_path / "f.pt")


# ------------------------------------------------------------------ data files


def test_missing_data_file(tmp_path):
    raises("data file not found", load_examples, tmp_path / "nope.pt")


def test_unknown_data_extension(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"x")
    raises(".npz", load_examples, tmp_path / "d.parquet")


def test_data_with_pickled_objects_is_never_unpickled(tmp_path):
    torch.save({"x": torch.zeros(2, 2), "meta": Pickled()}, tmp_path / "d.pt")
    raises("never unpickles", load_examples, tmp_path / "d.pt")


def test_object_npy(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raises("Python objects", load_examples, tmp_path / "o.npy")


def test_mismatched_data_lengths(tmp_path):
    torch.save({"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)}, tmp_path / "d.pt")
    message = raises("mismatched first dimensions", load_examples, tmp_path / "d.pt")
    assert "input_ids has 4" in message and "attention_mask has 5" in message
    torch.save((torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)), tmp_path / "xy.pt")
    raises("mismatched first dimensions", load_examples, tmp_path / "xy.pt")


def test_unsupported_pt_object(tmp_path):
    torch.save([1, 2, 3], tmp_path / "ints.pt")
    message = raises("a list of 3 items (int)", load_examples, tmp_path / "ints.pt")
    assert "dict of tensors" in message


def test_empty_data(tmp_path):
    torch.save(torch.zeros(0, 3), tmp_path / "e.pt")
    raises("empty", load_examples, tmp_path / "e.pt")
    (tmp_path / "e.csv").write_text("")
    raises("empty", load_examples, tmp_path / "e.csv")


def test_non_numeric_csv(tmp_path):
    pd.DataFrame({"a": [1, 2], "name": ["x", "y"]}).to_csv(tmp_path / "t.csv", index=False)
    raises("non-numeric columns in t.csv: name", load_examples, tmp_path / "t.csv")


def test_csv_missing_target_column(tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "t.csv", index=False)
    raises("target column 'label' not in t.csv", load_examples, tmp_path / "t.csv", target_column="label")


def test_target_column_on_data_without_named_entries(tmp_path):
    # It would be silently ignored: a typo, or a file other than the one meant.
    torch.save((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), tmp_path / "xy.pt")
    message = raises("--target-column 'label'", load_examples, tmp_path / "xy.pt", target_column="label")
    assert "drop --target-column" in message
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.float32))
    raises("--target-column", load_examples, tmp_path / "x.npy", target_column="y")


def test_long_csv_column_list_is_shortened(tmp_path):
    pd.DataFrame(np.zeros((2, 40)), columns=[f"f{i}" for i in range(40)]).to_csv(tmp_path / "wide.csv", index=False)
    message = raises("not in wide.csv", load_examples, tmp_path / "wide.csv", target_column="label")
    assert "f11, ... (40 in all)" in message and "f39" not in message


def test_random_bytes_are_not_called_a_pickle(tmp_path):
    # weights_only refuses random bytes with the same error as a real pickle: no --trust-checkpoint advice.
    (tmp_path / "noise.pt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)))
    message = raises("not a PyTorch checkpoint", load_model, tmp_path / "noise.pt")
    assert "--trust-checkpoint" not in message
    torch.save(torch.zeros(3), tmp_path / "noise_data.pt")
    (tmp_path / "noise_data.pt").write_bytes((tmp_path / "noise.pt").read_bytes())
    assert "unpickles" not in raises("not a torch.save file", load_examples, tmp_path / "noise_data.pt")


def test_truncated_checkpoint_says_truncated(tmp_path):
    torch.save(DigitsMLP().state_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    message = raises("truncated or damaged", load_model, tmp_path / "cut.pt", arch=MLP)
    assert "If you are seeing" not in message  # torch's run-on advice is cut at its first sentence


def test_text_named_npy_is_not_an_object_array(tmp_path):
    (tmp_path / "table.npy").write_text("a,b\n1,2\n")
    raises("not a .npy file", load_examples, tmp_path / "table.npy")
    (tmp_path / "table.npz").write_text("a,b\n1,2\n")
    raises("not a .npz file", load_examples, tmp_path / "table.npz")


def test_header_only_and_semicolon_csv(tmp_path):
    (tmp_path / "header.csv").write_text("a,b,label\n")
    raises("a header but no rows", load_examples, tmp_path / "header.csv")
    (tmp_path / "semi.csv").write_text("a;b;c\n1;2;3\n")
    raises("comma-separated", load_examples, tmp_path / "semi.csv")

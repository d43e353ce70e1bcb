"""checkpoint files -> nn.Module: every supported format, with real outputs compared."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from perdiag.checkpoints import (
    find_state_dict,
    import_callable,
    load_model,
    save_checkpoint,
    strip_wrapper_prefix,
)
from perdiag.errors import PerdiagError
from perdiag.models import DigitsCNN, DigitsMLP

MLP = "perdiag.models:DigitsMLP"
MLP_KWARGS = {"in_features": 64, "hidden": [32, 16], "n_classes": 10}
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def make_mlp(seed: int = 0) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP(**MLP_KWARGS)


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(1))


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_models_have_named_activation_modules():
    names = [n for n, m in DigitsCNN().named_modules() if isinstance(m, nn.ReLU)]
    assert names == ["features.act1", "features.act2", "classifier.act3"]
    assert sum(p.numel() for p in DigitsCNN().parameters()) < 100_000
    assert DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    for activation, cls in [("elu", nn.ELU), ("leaky_relu", nn.LeakyReLU), ("tanh", nn.Tanh), ("gelu", nn.GELU)]:
        assert isinstance(DigitsMLP(activation=activation).body.act1, cls)


def test_perdiag_round_trip(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, model, arch=MLP, arch_kwargs=MLP_KWARGS,
        metadata={"input_shape": [64], "sample_data": {"val": "val.pt"}},
        extra={"epoch": 3, "metrics": {"acc": 0.5}},
    )
    loaded = load_model(path)
    assert loaded.source == "perdiag" and not loaded.is_torchscript
    assert loaded.arch == MLP and loaded.arch_kwargs == MLP_KWARGS
    assert same_outputs(model, loaded.model, inputs)
    assert loaded.metadata["sample_data"]["val"] == str((tmp_path / "val.pt").resolve())
    assert loaded.metadata["torch_version"] == str(torch.__version__)
    assert loaded.checkpoint["epoch"] == 3
    assert loaded.model.training  # eval() is the caller's decision
    # the file is a plain dict that loads without unpickling objects
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "perdiag-checkpoint" and raw["format_version"] == 1


def test_sample_checkpoints_load_and_classify():
    from perdiag.data import load_examples

    for name in ("mlp", "cnn"):
        loaded = load_model(SAMPLES / f"digits_{name}.pt")
        val = load_examples(loaded.metadata["sample_data"]["val"])
        loaded.model.eval()
        with torch.no_grad():
            acc = (loaded.model(*val.args).argmax(1) == val.targets).float().mean().item()
        assert acc >= 0.93
        assert loaded.metadata["class_names"] == [str(d) for d in range(10)]


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "net", "ema_weights"])
def test_state_dict_under_any_key(tmp_path, inputs, wrapper):
    model = make_mlp()
    state = model.state_dict()
    obj = state if wrapper is None else {wrapper: state, "epoch": 7, "optimizer": {"state": {}, "param_groups": []}}
    path = tmp_path / "sd.pth"
    torch.save(obj, path)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert loaded.source == "state_dict" and loaded.checkpoint is None and loaded.metadata == {}
    assert same_outputs(model, loaded.model, inputs)
    assert find_state_dict(obj)[1] == (wrapper or "")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "_orig_mod.module."])
def test_wrapper_prefix_stripped(tmp_path, inputs, prefix):
    model = make_mlp()
    path = tmp_path / "ddp.bin"
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert same_outputs(model, loaded.model, inputs)
    assert any(f"stripped prefix {prefix!r}" in note for note in loaded.notes)


def test_strip_wrapper_prefix_only_uniform():
    state = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert strip_wrapper_prefix(state) == (state, None)


def test_nested_training_checkpoint(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "lightning.ckpt"
    torch.save({"checkpoint": {"state_dict": model.state_dict()}, "global_step": 10}, path)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert same_outputs(model, loaded.model, inputs)
    assert "checkpoint.state_dict" in loaded.notes[0]


def test_safetensors(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert same_outputs(model, loaded.model, inputs)


def test_strict_mismatch_lists_keys_and_names_no_strict(tmp_path):
    state = make_mlp().state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["head.bias"]
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    with pytest.raises(PerdiagError) as err:
        load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    message = str(err.value)
    assert "1 missing" in message and "head.bias" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert "--no-strict" in message and "\n" not in message


def test_non_strict_records_keys(tmp_path, inputs):
    model = make_mlp()
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["head.bias"]
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS, strict=False)
    assert loaded.missing_keys == ["head.bias"]
    assert loaded.unexpected_keys == ["extra.weight"]
    assert any("head.bias" in n for n in loaded.notes) and any("extra.weight" in n for n in loaded.notes)
    assert torch.equal(loaded.model.body.fc1.weight, model.body.fc1.weight)


def test_pickled_module_needs_trust(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(PerdiagError, match="--trust-checkpoint"):
        load_model(path)
    loaded = load_model(path, trust_checkpoint=True)
    assert loaded.source == "pickled_module" and loaded.arch == MLP
    assert same_outputs(model, loaded.model, inputs)


def test_pickled_dict_with_module_under_model(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "whole.pt"
    torch.save({"model": model, "epoch": 1}, path)
    loaded = load_model(path, trust_checkpoint=True)
    assert same_outputs(model, loaded.model, inputs)


def test_trusted_training_checkpoint_with_python_objects(tmp_path, inputs):
    import argparse

    model = make_mlp()
    path = tmp_path / "train.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": model.state_dict()}, path)
    with pytest.raises(PerdiagError, match="argparse.Namespace"):
        load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS, trust_checkpoint=True)
    assert loaded.source == "state_dict" and same_outputs(model, loaded.model, inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript(tmp_path, inputs):
    model = make_mlp()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    assert any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
    loaded = load_model(path)
    assert loaded.is_torchscript and loaded.source == "torchscript"
    assert same_outputs(model, loaded.model, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_their_dtype(tmp_path, inputs, dtype):
    model = make_mlp().to(dtype)
    path = tmp_path / "half.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert loaded.model.body.fc1.weight.dtype == dtype
    assert torch.equal(loaded.model.body.fc1.weight, model.body.fc1.weight)
    assert any(str(dtype).removeprefix("torch.") in n for n in loaded.notes)
    with torch.no_grad():
        assert loaded.model(inputs.to(dtype)).dtype == dtype


def test_device_tensors_are_mapped_to_cpu_first(tmp_path, inputs, monkeypatch):
    """A CUDA-saved file can't be written here; check load_model always passes map_location='cpu'."""
    model = make_mlp()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(path, arch=MLP, arch_kwargs=MLP_KWARGS)
    assert seen == ["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_saved_checkpoint_loads_on_requested_device(tmp_path, inputs):
    model = make_mlp().cuda()
    path = tmp_path / "cuda.pt"
    save_checkpoint(path, model, arch=MLP, arch_kwargs=MLP_KWARGS)
    torch.save(model.state_dict(), tmp_path / "cuda_sd.pt")
    assert next(load_model(path).model.parameters()).device.type == "cpu"
    loaded = load_model(tmp_path / "cuda_sd.pt", arch=MLP, arch_kwargs=MLP_KWARGS, device="cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"


def test_third_party_class_by_import_path(tmp_path):
    kwargs = {"input_size": 4, "hidden_size": 6, "batch_first": True}
    torch.manual_seed(0)
    lstm = nn.LSTM(**kwargs)
    path = tmp_path / "lstm.pt"
    torch.save(lstm.state_dict(), path)
    loaded = load_model(path, arch="torch.nn:LSTM", arch_kwargs=kwargs)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0], lstm(x)[0])


def test_import_callable_forms():
    assert import_callable("torch.nn:LSTM") is nn.LSTM
    assert import_callable("torch.nn.LSTM") is nn.LSTM
    assert import_callable("torch:nn.Linear") is nn.Linear


def test_save_checkpoint_unwraps_compiled_and_converts_numpy(tmp_path, inputs):
    import numpy as np

    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = make_mlp()
    path = tmp_path / "m.pt"
    save_checkpoint(path, Wrapper(model), arch=MLP, arch_kwargs=MLP_KWARGS,
                    extra={"metrics": {"acc": np.float32(0.5), "curve": np.arange(3)}})
    loaded = load_model(path)
    assert same_outputs(model, loaded.model, inputs)
    assert loaded.checkpoint["metrics"]["acc"] == 0.5
    assert torch.equal(loaded.checkpoint["metrics"]["curve"], torch.arange(3))


def test_checkpoint_arch_must_be_module_class(tmp_path):
    """A weights-only file must not be able to make perdiag call arbitrary functions."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "perdiag-checkpoint", "format_version": 1, "arch": "os:getcwd", "arch_kwargs": {},
                "state_dict": {"w": torch.zeros(1)}, "metadata": {}}, path)
    with pytest.raises(PerdiagError, match="not an nn.Module class"):
        load_model(path)

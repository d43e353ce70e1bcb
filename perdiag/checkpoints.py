"""Checkpoint files -> ready-to-run ``nn.Module``.

perdiag reads four kinds of file, tried in this order:

* TorchScript archives (``torch.jit.save``): a zip holding ``constants.pkl``; loaded with
  ``torch.jit.load``. No Python objects are unpickled.
* perdiag checkpoints (:func:`save_checkpoint`): a plain dict read with ``weights_only=True`` that
  names its architecture as an import path (``perdiag.models:DigitsCNN``) plus JSON keyword arguments.
* State dicts and training checkpoints (``.pt/.pth/.bin/.ckpt`` read with ``weights_only=True``,
  ``.safetensors`` with safetensors): the caller supplies the architecture (``--arch``); the tensors
  may sit at the top level or under any key (``state_dict``, ``model``, ``net``, ...).
* Fully pickled modules (``torch.save(model)``): refused unless the caller opts in with
  ``trust_checkpoint=True`` (``--trust-checkpoint``), because unpickling can run arbitrary code.

Everything is read onto the CPU first (``map_location="cpu"``) and then moved to the requested
device, so checkpoints saved on a GPU load on machines without one. Weights keep their dtype.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perdiag.errors import PerdiagError
from perdiag.files import atomic_path, looks_like_torch_save

FORMAT_NAME = "perdiag-checkpoint"
FORMAT_VERSION = 1

#: Extensions read with ``torch.load`` (or ``torch.jit.load`` when the file is a TorchScript archive).
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".ts")
SAFETENSORS_EXTENSIONS = (".safetensors",)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS

#: Keys under which training scripts commonly store the model's tensors, tried first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params")

#: Prefixes added by wrappers: DistributedDataParallel / DataParallel, torch.compile, Lightning.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

_ARCH_HINT = "pass --arch package.module:callable (and --arch-kwargs JSON for its keyword arguments)"
_MAX_LISTED = 10


@dataclass
class LoadedModel:
    """A model read from a file, and how it was read.

    ``metadata`` is the perdiag metadata dict (``{}`` for other formats) with ``sample_data`` paths
    resolved to absolute path strings. ``checkpoint`` is the raw perdiag dict (training resumes
    from its ``optimizer_state`` / ``epoch``), ``None`` for other formats.
    """

    model: nn.Module
    source: str  # "perdiag" | "state_dict" | "pickled_module" | "torchscript"
    path: Path
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    checkpoint: dict | None = None
    notes: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def is_torchscript(self) -> bool:
        return self.source == "torchscript"


# --------------------------------------------------------------------------- architectures


def import_callable(spec: str) -> Any:
    """Resolve ``"package.module:attr.path"`` (or ``"package.module.attr"``) to the object it names."""
    if not isinstance(spec, str) or not spec.strip():
        raise PerdiagError(f"bad architecture {spec!r}; write it as package.module:callable, e.g. torch.nn:LSTM")
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    elif "." in spec:
        module_name, _, attr_path = spec.rpartition(".")
    else:
        module_name, attr_path = "", ""
    if not module_name or not attr_path or ":" in attr_path:
        raise PerdiagError(f"bad architecture {spec!r}; write it as package.module:callable, e.g. torch.nn:LSTM")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise PerdiagError(
            f"cannot import module {module_name!r} named in architecture {spec!r} ({err}); "
            "install its package or add its folder to PYTHONPATH"
        ) from err
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PerdiagError(
                f"module {module_name!r} has no attribute {attr_path!r} (architecture {spec!r}); check the spelling"
            ) from None
    if not callable(target):
        raise PerdiagError(
            f"architecture {spec!r} names a {type(target).__name__}, not a class or function; "
            "write package.module:Callable, e.g. torch.nn:LSTM"
        )
    return target


def build_model(arch: str, arch_kwargs: dict | None = None, *, require_module_class: bool = False) -> nn.Module:
    """Call the callable named by ``arch`` with ``arch_kwargs`` and check it returns an ``nn.Module``.

    ``require_module_class`` (used when ``arch`` comes from a file, not from the user) only accepts
    ``nn.Module`` subclasses, so a checkpoint cannot make perdiag call an arbitrary function.
    """
    arch_kwargs = dict(arch_kwargs or {})
    factory = import_callable(arch)
    if require_module_class and not (isinstance(factory, type) and issubclass(factory, nn.Module)):
        raise PerdiagError(
            f"the checkpoint names architecture {arch!r}, which is not an nn.Module class; refusing to call it "
            "(pass --arch yourself, or --trust-checkpoint if the file comes from a trusted source)"
        )
    try:
        model = factory(**arch_kwargs)
    except TypeError as err:
        raise PerdiagError(
            f"architecture {arch} rejected keyword arguments {json.dumps(arch_kwargs, default=str)}: {err}; "
            "fix --arch-kwargs"
        ) from err
    if not isinstance(model, nn.Module):
        raise PerdiagError(f"architecture {arch} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- state dicts


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def find_state_dict(obj: Any) -> tuple[dict, str]:
    """The mapping of tensors inside a loaded checkpoint, and the key path it was under.

    Returns ``(state_dict, key)`` where ``key`` is ``""`` for a top-level state dict, else e.g.
    ``"model"`` or ``"checkpoint.state_dict"``. Well-known keys (:data:`STATE_DICT_KEYS`) are tried
    first, then any other key whose value is a mapping of tensors (the largest wins), searching up to
    three levels deep. Optimizer states, epoch counters etc. are skipped because they are not
    mappings of tensors.
    """
    found = _search_state_dict(obj, depth=3)
    if found is None:
        if isinstance(obj, Mapping):
            keys = ", ".join(repr(k) for k in list(obj)[:_MAX_LISTED])
            raise PerdiagError(
                f"found no mapping of parameter names to tensors in the checkpoint (top-level keys: {keys or 'none'}); "
                "save the model's state_dict() or use perdiag's checkpoint format"
            )
        raise PerdiagError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict or a model; "
            "save the model's state_dict() or use perdiag's checkpoint format"
        )
    state_dict, key = found
    return dict(state_dict), key


def _search_state_dict(obj: Any, depth: int) -> tuple[Mapping, str] | None:
    if _is_tensor_mapping(obj):
        return obj, ""
    if depth == 0 or not isinstance(obj, Mapping):
        return None
    preferred = [k for k in STATE_DICT_KEYS if k in obj]
    for key in preferred:
        found = _search_state_dict(obj[key], depth - 1)
        if found is not None:
            return found[0], _join(key, found[1])
    others = []
    for key, value in obj.items():
        if key in preferred or not isinstance(value, Mapping):
            continue
        found = _search_state_dict(value, depth - 1)
        if found is not None:
            others.append((len(found[0]), str(key), found))
    if not others:
        return None
    _, key, found = max(others, key=lambda item: item[0])
    return found[0], _join(key, found[1])


def _join(key: Any, rest: str) -> str:
    return f"{key}.{rest}" if rest else str(key)


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, str | None]:
    """Remove prefixes that wrappers put on every key: ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``model.``.

    Only a prefix shared by *all* keys is removed, repeatedly (``_orig_mod.module.x`` -> ``x``).
    Returns the new dict and the removed prefix (``None`` when nothing was removed).
    """
    stripped = dict(state_dict)
    removed = ""
    changed = True
    while changed and stripped:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in stripped):
                stripped = {k[len(prefix):]: v for k, v in stripped.items()}
                removed += prefix
                changed = True
                break
    return stripped, (removed or None)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _load_state_into(
    model: nn.Module, state_dict: dict, *, arch: str, strict: bool, notes: list[str]
) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``model`` after stripping wrapper prefixes; returns (missing, unexpected)."""
    expected = model.state_dict()
    stripped, prefix = strip_wrapper_prefix(state_dict)
    # Strip only when it helps: a model may legitimately keep all its weights under ``model.``.
    if prefix is not None and len(expected.keys() & stripped.keys()) > len(expected.keys() & state_dict.keys()):
        state_dict = stripped
        notes.append(f"stripped prefix {prefix!r} from every key (a DistributedDataParallel/compile/Lightning wrapper)")

    for name, tensor in state_dict.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise PerdiagError(
                f"parameter {name!r} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(expected[name].shape)} "
                f"in {arch}; fix --arch-kwargs so the architecture matches the checkpoint"
            )
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected in the checkpoint ({_listed(unexpected)})")
        raise PerdiagError(
            f"the checkpoint's keys do not match {arch}: {'; '.join(parts)}; check --arch/--arch-kwargs, "
            "or pass --no-strict to load the matching keys anyway"
        )

    _adopt_checkpoint_dtype(model, state_dict, notes)
    model.load_state_dict(state_dict, strict=False)
    if missing:
        notes.append(f"--no-strict: {len(missing)} parameters kept their initial values: {_listed(missing)}")
    if unexpected:
        notes.append(f"--no-strict: ignored {len(unexpected)} checkpoint keys: {_listed(unexpected)}")
    return missing, unexpected


def _adopt_checkpoint_dtype(model: nn.Module, state_dict: Mapping[str, torch.Tensor], notes: list[str]) -> None:
    """Cast the model to the checkpoint's floating dtype so that fp16/bf16 weights run as saved."""
    counts = Counter(t.dtype for t in state_dict.values() if t.is_floating_point())
    if not counts:
        return
    dtype = counts.most_common(1)[0][0]
    model_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if model_dtypes and model_dtypes != {dtype}:
        model.to(dtype)
    if dtype != torch.float32:
        notes.append(f"weights are {_dtype_name(dtype)}; the model runs in {_dtype_name(dtype)} (inputs are cast to it)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _note_module_dtype(model: nn.Module, notes: list[str]) -> None:
    dtypes = sorted({_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if dtypes and dtypes != ["float32"]:
        notes.append(f"weights are {'/'.join(dtypes)}; the model runs in that dtype")


# --------------------------------------------------------------------------- reading files


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise PerdiagError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PerdiagError(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PerdiagError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise PerdiagError(f"device {device!r} requested but MPS is not available on this machine; use --device cpu")
    return resolved


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _check_file(path: Path) -> None:
    if not path.exists():
        raise PerdiagError(f"checkpoint not found: {path}; check the path")
    if path.is_dir():
        raise PerdiagError(f"{path} is a folder; pass the checkpoint file inside it")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise PerdiagError(
            f"unknown checkpoint extension {path.suffix or '(none)'!r} for {path.name}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not os.access(path, os.R_OK):
        raise PerdiagError(f"cannot read {path}: permission denied")


def _pickled_refusal(path: Path, err: Exception) -> PerdiagError:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" (it references {found.group(1)})" if found else ""
    return PerdiagError(
        f"{path.name} holds pickled Python objects{what}, not just tensors; unpickling it can run arbitrary code. "
        "Pass --trust-checkpoint (trust_checkpoint=True) only if the file comes from a trusted source, "
        "or re-save it as model.state_dict() / safetensors"
    )


def _torch_load_weights(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line PerdiagError.

    Returns the object, or raises ``_NeedsUnpickling`` when the file is readable but holds Python objects.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) and looks_like_torch_save(path):
            raise _NeedsUnpickling(err) from err
        raise PerdiagError(
            f"cannot read {path}: not a PyTorch checkpoint (it does not start like a torch.save file); check the file"
        ) from err
    except OSError as err:
        raise PerdiagError(
            f"cannot read {path}: truncated or damaged ({err.strerror or err}); save or copy it again"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... on corrupt files
        what = "truncated or damaged" if looks_like_torch_save(path) else "not a PyTorch checkpoint"
        detail = _first_line(err).split(". ")[0]  # torch's zip errors run on for several sentences
        raise PerdiagError(f"cannot read {path}: {what} ({type(err).__name__}: {detail}); check the file") from err


class _NeedsUnpickling(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    strict: bool = True,
    trust_checkpoint: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Read a model from ``path`` (see the module docstring for the formats) onto ``device``.

    ``arch`` / ``arch_kwargs`` name the architecture for plain state dicts and override the one a
    perdiag checkpoint records. ``strict=False`` loads a state dict whose keys do not all match and
    records them in ``missing_keys`` / ``unexpected_keys`` and ``notes``. The model is not put in
    eval mode here.
    """
    path = Path(path).expanduser()
    _check_file(path)
    target = _resolve_device(device)
    notes: list[str] = []

    if path.suffix.lower() in SAFETENSORS_EXTENSIONS:
        loaded = _load_safetensors(path)
        notes.append("read a safetensors state dict")
        result = _from_state_dict(path, loaded, "", arch=arch, arch_kwargs=arch_kwargs, strict=strict, notes=notes)
        result.model.to(target)
        return result

    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # torch 2.9+ marks TorchScript deprecated; the user chose this file, the warning is noise.
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise PerdiagError(f"cannot load TorchScript archive {path}: {_first_line(err)}") from err
        notes.append("loaded a TorchScript archive with torch.jit.load")
        _note_module_dtype(model, notes)
        return LoadedModel(model=model.to(target), source="torchscript", path=path, notes=notes)

    try:
        obj = _torch_load_weights(path)
    except _NeedsUnpickling as needs:
        if not trust_checkpoint:
            raise _pickled_refusal(path, needs.cause) from None
        result = _load_trusted(path, arch=arch, arch_kwargs=arch_kwargs, strict=strict, notes=notes)
        result.model.to(target)
        return result

    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        result = _from_perdiag(path, dict(obj), arch=arch, arch_kwargs=arch_kwargs, strict=strict, notes=notes)
    else:
        state_dict, key = find_state_dict(obj)
        notes.append(f"read a state dict from key {key!r}" if key else "read a top-level state dict")
        result = _from_state_dict(path, state_dict, key, arch=arch, arch_kwargs=arch_kwargs, strict=strict, notes=notes)
    result.model.to(target)
    return result


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PerdiagError(f"cannot read {path}: not a valid safetensors file ({_first_line(err)})") from err


def _from_state_dict(
    path: Path, state_dict: dict, key: str, *, arch: str | None, arch_kwargs: dict | None, strict: bool, notes: list[str]
) -> LoadedModel:
    if arch is None:
        raise PerdiagError(
            f"{path.name} holds only weights (a state dict) and does not say which architecture they belong to; {_ARCH_HINT}"
        )
    if not _is_tensor_mapping(state_dict):
        raise PerdiagError(f"{path.name} holds no tensors; nothing to load")
    arch_kwargs = dict(arch_kwargs or {})
    model = build_model(arch, arch_kwargs)
    missing, unexpected = _load_state_into(model, state_dict, arch=arch, strict=strict, notes=notes)
    return LoadedModel(
        model=model, source="state_dict", path=path, arch=arch, arch_kwargs=arch_kwargs,
        notes=notes, missing_keys=missing, unexpected_keys=unexpected,
    )


def _from_perdiag(
    path: Path, checkpoint: dict, *, arch: str | None, arch_kwargs: dict | None, strict: bool, notes: list[str]
) -> LoadedModel:
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PerdiagError(
            f"{path.name} uses perdiag checkpoint format version {version!r}; this perdiag reads up to "
            f"{FORMAT_VERSION}: upgrade perdiag"
        )
    saved_arch = checkpoint.get("arch")
    if arch is None:
        if not isinstance(saved_arch, str):
            raise PerdiagError(f"{path.name} is a perdiag checkpoint without an 'arch' entry; {_ARCH_HINT}")
        use_arch, use_kwargs, from_file = saved_arch, dict(checkpoint.get("arch_kwargs") or {}), True
    else:
        use_arch = arch
        use_kwargs = dict(arch_kwargs if arch_kwargs is not None else (checkpoint.get("arch_kwargs") or {}))
        from_file = False
        if arch != saved_arch:
            notes.append(f"--arch {arch} overrides the checkpoint's architecture {saved_arch}")
    state_dict = checkpoint.get("state_dict")
    if not _is_tensor_mapping(state_dict):
        raise PerdiagError(f"{path.name} is a perdiag checkpoint without a state_dict of tensors; re-save it")
    model = build_model(use_arch, use_kwargs, require_module_class=from_file)
    notes.append(f"read a perdiag checkpoint (format {version}) for {use_arch}")
    missing, unexpected = _load_state_into(model, dict(state_dict), arch=use_arch, strict=strict, notes=notes)
    metadata = _resolve_metadata(path, checkpoint.get("metadata") or {})
    return LoadedModel(
        model=model, source="perdiag", path=path, arch=use_arch, arch_kwargs=use_kwargs, metadata=metadata,
        checkpoint=checkpoint, notes=notes, missing_keys=missing, unexpected_keys=unexpected,
    )


def _resolve_metadata(path: Path, metadata: Mapping) -> dict:
    """Copy ``metadata`` with ``sample_data`` paths made absolute (they are stored relative to the file)."""
    resolved = dict(metadata)
    sample_data = metadata.get("sample_data")
    if isinstance(sample_data, Mapping):
        folder = path.resolve().parent
        resolved["sample_data"] = {
            split: str((folder / relative).resolve()) if isinstance(relative, str) else relative
            for split, relative in sample_data.items()
        }
    return resolved


def _load_trusted(
    path: Path, *, arch: str | None, arch_kwargs: dict | None, strict: bool, notes: list[str]
) -> LoadedModel:
    """Unpickle ``path`` (the caller opted in) and take the module, or the state dict, inside."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        if "__main__" in str(err):
            # The class lived in the script that saved the file: no install or path can bring it back.
            raise PerdiagError(
                f"{path.name} pickles a class defined in the script that saved it (__main__), which only "
                f"that script can unpickle ({_first_line(err)}); save model.state_dict() instead and load "
                "it with --arch package.module:Class, with the class moved into an importable module"
            ) from err
        raise PerdiagError(
            f"{path.name} pickles a class that cannot be imported here ({_first_line(err)}); "
            "install the package that defines it or add its folder to PYTHONPATH"
        ) from err
    except Exception as err:
        raise PerdiagError(f"cannot unpickle {path}: {type(err).__name__}: {_first_line(err)}") from err
    notes.append("unpickled the file with weights_only=False (--trust-checkpoint)")
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        module = obj["model"]
        notes.append("took the module stored under key 'model'")
    if module is not None:
        if arch is not None:
            notes.append(f"--arch {arch} ignored: the file holds a whole module")
        _note_module_dtype(module, notes)
        arch_name = f"{type(module).__module__}:{type(module).__qualname__}"
        return LoadedModel(model=module, source="pickled_module", path=path, arch=arch_name, notes=notes)
    if isinstance(obj, Mapping):
        # A training checkpoint with some pickled extras (numpy RNG state, argparse Namespace...).
        state_dict, key = find_state_dict(obj)
        notes.append(f"read a state dict from key {key!r}" if key else "read a top-level state dict")
        return _from_state_dict(path, state_dict, key, arch=arch, arch_kwargs=arch_kwargs, strict=strict, notes=notes)
    raise PerdiagError(
        f"{path.name} holds a {type(obj).__name__}, not a torch.nn.Module or a dict with one under 'model'"
    )


# --------------------------------------------------------------------------- writing


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """Turn ``value`` into something ``torch.load(weights_only=True)`` accepts (numpy -> tensor/float...)."""
    import numpy as np

    if value is None or type(value) in (bool, int, float, str) or isinstance(value, (torch.Tensor, torch.dtype, torch.Size)):
        return value
    # Subclasses (torch.__version__ is a TorchVersion, IntEnum members...) would be pickled by class.
    for plain_type in (bool, int, float, str):
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"cannot store {type(value).__name__} at {where} in a perdiag checkpoint: only tensors, numbers, strings, "
        "lists and dicts load with weights_only=True"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict,
    metadata: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write ``model`` in perdiag's checkpoint format, atomically.

    The state dict is moved to the CPU (wrappers such as DDP / torch.compile are unwrapped first) so
    that the file loads anywhere. ``arch_kwargs`` must be JSON-serialisable; ``metadata`` gains
    ``perdiag_version`` and ``torch_version``. ``extra`` adds top-level entries such as
    ``train_config``, ``metrics``, ``optimizer_state``, ``epoch``, ``rng_state``.
    """
    try:
        arch_kwargs = json.loads(json.dumps(arch_kwargs))
    except (TypeError, ValueError) as err:
        raise TypeError(f"arch_kwargs must be JSON-serialisable: {err}") from err
    from perdiag import __version__

    meta = {"perdiag_version": str(__version__), "torch_version": str(torch.__version__)}
    meta.update(_plain(dict(metadata or {}), "metadata"))
    state_dict = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    checkpoint: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": state_dict,
        "metadata": meta,
    }
    for key, value in (extra or {}).items():
        if key in checkpoint:
            raise ValueError(f"extra key {key!r} would overwrite a reserved checkpoint entry")
        checkpoint[key] = _plain(value, key)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        # A file object (not a path) keeps the random temporary name out of the zip's folder name.
        torch.save(checkpoint, handle)

"""Data files -> batches of model inputs.

Supported files and how they become model inputs:

* ``.pt`` (read with ``torch.load(weights_only=True)``; data files are never unpickled):
    - a tensor: the single positional input;
    - ``(inputs, targets)``: a tuple or list of exactly two tensors with the same first dimension;
    - a list of batches: tensors, ``(x, y)`` pairs or dicts, concatenated along dim 0;
    - a dict of tensors: keyword arguments of ``model(**kwargs)`` (``input_ids``, ``attention_mask``...),
      except that an entry named ``x`` / ``X`` / ``inputs`` / ``input`` is passed positionally.
* ``.npy``: one array, the positional input. ``.npz``: ``x`` / ``X`` / ``inputs`` (positional) plus
  optional ``y`` / ``targets`` / ``labels``; a single unnamed array (``arr_0``) is the input; other
  arrays are keyword inputs.
* ``.csv`` (pandas): every numeric column is a feature of one float32 input of shape (n, k); the
  targets are ``target_column``, else a column named as below, and are removed from the inputs. A
  first line of numbers only is data, not a header: the columns are then named "0", "1", ...

In dicts, ``.npz`` and ``.csv`` files an entry named ``targets``, ``labels``, ``target``, ``label`` or
``y`` (or ``target_column``) is taken as the targets and is NOT passed to the model. Integer inputs (token
ids) stay integer; float64 inputs become float32 because model weights are float32 (recorded in
``Examples.notes``). Every example tensor shares its first dimension, the example axis.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from perdiag.errors import PerdiagError
from perdiag.files import NPY_MAGIC, ZIP_MAGIC, looks_like_torch_save, starts_with

SUPPORTED_EXTENSIONS = (".pt", ".pth", ".npy", ".npz", ".csv")
TARGET_KEYS = ("targets", "labels", "target", "label", "y")
POSITIONAL_KEYS = ("x", "X", "inputs", "input")


@dataclass
class Batch:
    """One batch of model inputs: ``model(*args, **kwargs)``; ``targets`` is never passed to the model.

    All tensors share their first dimension, the number of examples in the batch.
    """

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        for tensor in (*self.args, *self.kwargs.values()):
            return int(tensor.shape[0])
        return 0

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Batch:
        """Move every tensor to ``device``; with ``dtype``, also cast floating-point inputs (fp16 models)."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if dtype is not None and tensor.is_floating_point():
                return tensor.to(device=device, dtype=dtype)
            return tensor.to(device)

        return Batch(
            args=tuple(move(a) for a in self.args),
            kwargs={k: move(v) for k, v in self.kwargs.items()},
            targets=None if self.targets is None else self.targets.to(device),
        )

    def call(self, model: Any) -> Any:
        """``model(*args, **kwargs)``; inputs the model's ``forward`` cannot take are a PerdiagError."""
        try:
            return model(*self.args, **self.kwargs)
        except TypeError as err:
            mismatch = _signature_mismatch(model, self.args, self.kwargs)
            if mismatch is None:
                raise  # a TypeError inside forward: the model's own, not the data's
            given = [f"{len(self.args)} positional"] if self.args else []
            given += [f"keyword {', '.join(self.kwargs)}"] if self.kwargs else []
            raise PerdiagError(
                f"the model's forward{mismatch[0]} cannot take the data's inputs ({' and '.join(given) or 'none'}): "
                f"{mismatch[1]}. Entries of a dict or .npz are keyword arguments, except x / X / inputs / input "
                "(positional) and targets / labels / target / label / y (the targets): rename them, or name the "
                "targets with --target-column"
            ) from err


def _signature_mismatch(model: Any, args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """(forward's signature, why ``args``/``kwargs`` do not bind to it), or None if they do (or it is unknown)."""
    import inspect

    forward = getattr(model, "forward", model)
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # builtins, TorchScript
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        return str(signature), str(err)
    return None


class Examples(Dataset):
    """In-memory examples: positional inputs, keyword inputs and optional targets, first-dim aligned.

    ``examples[i]`` is ``(args_i, kwargs_i, target_i or None)``; use :func:`make_loader` (custom collate)
    to batch them, with any sampler, including ``DistributedSampler``.
    """

    def __init__(
        self,
        args: Sequence[torch.Tensor] = (),
        kwargs: Mapping[str, torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        *,
        notes: list[str] | None = None,
        source: str | None = None,
        arg_names: Sequence[str] | None = None,
    ) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.targets = targets
        self.notes = list(notes or [])
        self.source = source
        if arg_names is None:
            arg_names = ["x"] if len(self.args) == 1 else [f"arg{i}" for i in range(len(self.args))]
        self.arg_names = list(arg_names)
        where = f" in {source}" if source else ""
        if not self.args and not self.kwargs:
            raise PerdiagError(f"no model inputs{where}; the file holds no input tensors")
        lengths = {name: int(t.shape[0]) if t.ndim else None for name, t in self._named()}
        if self.targets is not None:
            lengths["targets"] = int(self.targets.shape[0]) if self.targets.ndim else None
        scalars = [name for name, n in lengths.items() if n is None]
        if scalars:
            raise PerdiagError(f"{', '.join(scalars)}{where} is a scalar; inputs need a first (example) dimension")
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
            raise PerdiagError(f"mismatched first dimensions{where}: {described}; every tensor needs one row per example")
        if next(iter(lengths.values())) == 0:
            raise PerdiagError(f"no examples{where}: the data is empty")

    def _named(self) -> list[tuple[str, torch.Tensor]]:
        return [*zip(self.arg_names, self.args), *self.kwargs.items()]

    def __len__(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0])

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor], torch.Tensor | None]:
        return (
            tuple(a[index] for a in self.args),
            {k: v[index] for k, v in self.kwargs.items()},
            None if self.targets is None else self.targets[index],
        )

    @property
    def has_targets(self) -> bool:
        return self.targets is not None

    def inputs_description(self) -> str:
        """E.g. ``"x: (1797, 64) float32; targets: (1797,) int64"``: inputs, keyword inputs, then targets."""
        named = list(self._named())
        if self.targets is not None:
            named.append(("targets", self.targets))
        return "; ".join(f"{name}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in named)


def collate_examples(items: Sequence[tuple]) -> Batch:
    """Stack the ``(args, kwargs, target)`` triples of :meth:`Examples.__getitem__` into a :class:`Batch`."""
    first_args, first_kwargs, first_target = items[0]
    args = tuple(torch.stack([item[0][i] for item in items]) for i in range(len(first_args)))
    kwargs = {k: torch.stack([item[1][k] for item in items]) for k in first_kwargs}
    targets = None if first_target is None else torch.stack([item[2] for item in items])
    return Batch(args=args, kwargs=kwargs, targets=targets)


def make_loader(
    examples: Examples,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    sampler: Any = None,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``examples`` that yields :class:`Batch` objects.

    Shuffling uses a generator seeded with ``seed`` so runs repeat; with a ``sampler`` (e.g.
    ``DistributedSampler``) the sampler decides the order and ``shuffle`` must be False.
    """
    if batch_size < 1:
        raise PerdiagError(f"batch size must be at least 1, got {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate_examples,
        generator=generator,
    )


def iter_batches(examples: Examples, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
    """Consecutive batches in file order, as slices (views) of the stored tensors; the last may be short."""
    if batch_size < 1:
        raise PerdiagError(f"batch size must be at least 1, got {batch_size}")
    for count, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        stop = start + batch_size
        yield Batch(
            args=tuple(a[start:stop] for a in examples.args),
            kwargs={k: v[start:stop] for k, v in examples.kwargs.items()},
            targets=None if examples.targets is None else examples.targets[start:stop],
        )


def random_examples(n: int, input_shape: tuple[int, ...], seed: int = 0) -> Examples:
    """``n`` inputs of shape ``input_shape`` drawn from N(0, 1) in float32, without targets."""
    if n < 1:
        raise PerdiagError(f"need at least one random example, got n={n}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    inputs = torch.randn((n, *tuple(int(s) for s in input_shape)), generator=generator, dtype=torch.float32)
    return Examples((inputs,), source=f"random N(0, 1) inputs, seed {seed}")


# --------------------------------------------------------------------------- reading files


def load_examples(
    path: str | os.PathLike,
    *,
    target_column: str | None = None,
    inputs_key: str | Sequence[str] | None = None,
) -> Examples:
    """Read examples from ``path`` (formats in the module docstring).

    Args:
        target_column: for ``.csv``, the column used as targets (and dropped from the inputs); for
            dicts and ``.npz``, the entry used as targets instead of the default names.
        inputs_key: for dicts and ``.npz``, the entry (or entries, in order) passed positionally;
            the other non-target entries are passed as keyword arguments.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PerdiagError(f"data file not found: {path}; check the path")
    if path.is_dir():
        raise PerdiagError(f"{path} is a folder; pass a data file ({', '.join(SUPPORTED_EXTENSIONS)})")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise PerdiagError(
            f"unknown data extension {path.suffix or '(none)'!r} for {path.name}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if suffix == ".csv":
        return _read_csv(path, target_column)
    if suffix == ".npy":
        return _assemble(path, _read_npy(path), target_column, inputs_key)
    if suffix == ".npz":
        return _assemble(path, _read_npz(path), target_column, inputs_key)
    return _assemble(path, _read_pt(path), target_column, inputs_key)


def _read_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) and looks_like_torch_save(path):
            raise PerdiagError(
                f"{path.name} holds pickled Python objects, not just tensors; perdiag never unpickles data files. "
                "Save tensors only (torch.save(tensor), (x, y) or a dict of tensors) or use .npy/.npz/.csv"
            ) from err
        raise PerdiagError(f"cannot read {path}: not a torch.save file") from err
    except OSError as err:
        raise PerdiagError(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # corrupt or truncated files raise RuntimeError, EOFError, KeyError...
        raise PerdiagError(f"cannot read {path}: not a torch.save file or truncated ({type(err).__name__})") from err


def _read_npy(path: Path) -> Any:
    if not starts_with(path, NPY_MAGIC):
        raise PerdiagError(f"cannot read {path}: not a .npy file (write it with numpy.save)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise PerdiagError(f"{path.name} holds Python objects (an object array); save a numeric array instead") from err
    except OSError as err:
        raise PerdiagError(f"cannot read {path}: not a .npy file ({err})") from err


def _read_npz(path: Path) -> dict:
    if not starts_with(path, ZIP_MAGIC):
        raise PerdiagError(f"cannot read {path}: not a .npz file (write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as err:
        raise PerdiagError(f"{path.name} holds Python objects (an object array); save numeric arrays instead") from err
    except (OSError, EOFError) as err:
        raise PerdiagError(f"cannot read {path}: not a .npz file ({err})") from err


def _as_tensor(value: Any, name: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise PerdiagError(f"{name} in {path.name} has dtype {value.dtype}; only numeric arrays are supported")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise PerdiagError(f"{name} in {path.name} is a {type(value).__name__}, not a tensor")


def _cat(parts: list[torch.Tensor], name: str, path: Path) -> torch.Tensor:
    try:
        return torch.cat(parts, dim=0)
    except RuntimeError as err:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts[:5])
        raise PerdiagError(f"cannot concatenate the batches of {name} in {path.name} (shapes {shapes}...)") from err


def _describe(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        inner = sorted({type(x).__name__ for x in obj})
        return f"a {type(obj).__name__} of {len(obj)} items ({', '.join(inner) or 'empty'})"
    return f"a {type(obj).__name__}"


_SUPPORTED_PT = "a tensor, (inputs, targets), a list of batches, or a dict of tensors"


def _assemble(path: Path, obj: Any, target_column: str | None, inputs_key: Any) -> Examples:
    """Turn a loaded object (tensor, array, tuple, list, dict) into :class:`Examples`."""
    if target_column is not None and not _has_named_entries(obj):
        # Ignoring it would hide a typo or a wrong file: there is nothing it could name.
        raise PerdiagError(
            f"--target-column {target_column!r} names a CSV column or an entry of a dict / .npz file, but "
            f"{path.name} holds {_describe(obj)}; drop --target-column (an (inputs, targets) pair is read as such)"
        )
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _finish(path, {"x": _as_tensor(obj, "the data", path)}, ["x"], None)
    if isinstance(obj, Mapping):
        return _from_mapping(path, obj, target_column, inputs_key)
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise PerdiagError(f"no examples in {path}: the data is empty")
        if all(isinstance(x, torch.Tensor) for x in obj):
            if len(obj) == 2 and _looks_like_pair(obj[0], obj[1]):
                return _finish(path, {"x": obj[0]}, ["x"], obj[1])
            return _finish(path, {"x": _cat(list(obj), "the inputs", path)}, ["x"], None)
        if all(isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x) for x in obj):
            inputs = _cat([x[0] for x in obj], "the inputs", path)
            targets = _cat([x[1] for x in obj], "the targets", path)
            return _finish(path, {"x": inputs}, ["x"], targets)
        if all(isinstance(x, Mapping) for x in obj):
            keys = list(obj[0])
            if any(list(x) != keys for x in obj):
                raise PerdiagError(f"the batches in {path.name} do not all have the same keys (first has {keys})")
            merged = {k: _cat([_as_tensor(x[k], repr(k), path) for x in obj], repr(k), path) for k in keys}
            return _from_mapping(path, merged, target_column, inputs_key)
    raise PerdiagError(f"{path.name} holds {_describe(obj)}; supported: {_SUPPORTED_PT}")


def _has_named_entries(obj: Any) -> bool:
    """A dict, or a list of dict batches: data whose entries have names."""
    return isinstance(obj, Mapping) or (
        isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(x, Mapping) for x in obj)
    )


def _looks_like_pair(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Two tensors are (inputs, targets) unless they only make sense as two batches of one input."""
    if first.ndim == 0 or second.ndim == 0:
        return True
    same_rows = first.shape[0] == second.shape[0]
    same_kind = first.shape[1:] == second.shape[1:] and first.dtype == second.dtype
    return same_rows or not same_kind


def _from_mapping(path: Path, mapping: Mapping, target_column: str | None, inputs_key: Any) -> Examples:
    if not mapping:
        raise PerdiagError(f"no examples in {path}: the dict is empty")
    entries = {str(k): _as_tensor(v, repr(k), path) for k, v in mapping.items()}
    if target_column is not None:
        if target_column not in entries:
            raise PerdiagError(f"target {target_column!r} not found in {path.name}; entries: {', '.join(entries)}")
        target_key: str | None = target_column
    elif list(entries) == ["arr_0", "arr_1"] and _looks_like_pair(entries["arr_0"], entries["arr_1"]):
        target_key = "arr_1"  # np.savez(path, x, y): unnamed arrays in order, as an (inputs, targets) pair
    else:
        target_key = next((k for k in TARGET_KEYS if k in entries), None)
    targets = entries.pop(target_key) if target_key is not None else None
    if inputs_key is not None:
        positional = [inputs_key] if isinstance(inputs_key, str) else list(inputs_key)
        absent = [k for k in positional if k not in entries]
        if absent:
            raise PerdiagError(f"input {', '.join(absent)} not found in {path.name}; entries: {', '.join(entries)}")
    else:
        positional = [k for k in POSITIONAL_KEYS if k in entries][:1]
        if not positional and list(entries) == ["arr_0"]:
            positional = ["arr_0"]  # np.savez(path, array): a single unnamed array is the input
    if not entries:
        raise PerdiagError(f"{path.name} holds only targets ({target_key}); no model inputs")
    return _finish(path, entries, positional, targets)


def _finish(path: Path, entries: dict[str, torch.Tensor], positional: list[str], targets: torch.Tensor | None) -> Examples:
    notes: list[str] = []
    converted = {}
    for name, tensor in entries.items():
        if tensor.dtype == torch.float64:
            tensor = tensor.float()
            notes.append(f"{name}: float64 converted to float32 (model weights are float32)")
        converted[name] = tensor
    if targets is not None and targets.dtype == torch.float64:
        targets = targets.float()
    return Examples(
        args=tuple(converted[k] for k in positional),
        kwargs={k: v for k, v in converted.items() if k not in positional},
        targets=targets,
        notes=notes,
        source=str(path),
        arg_names=positional,
    )


def _read_csv(path: Path, target_column: str | None) -> Examples:
    import pandas as pd

    notes = []
    try:
        frame = pd.read_csv(path)
        # pandas renames repeated names ("0.5", "0.5.1"): judge the header from the raw first line.
        if _reads_as_data(_first_csv_line(path)):
            # The "names" are numbers (and not just column indices): the first line is an example.
            frame = pd.read_csv(path, header=None)
            frame.columns = [str(index) for index in range(frame.shape[1])]
            notes.append(f"{path.name}: no header row (its first line is numbers); columns are numbered 0..{frame.shape[1] - 1}")
    except pd.errors.EmptyDataError as err:
        raise PerdiagError(f"no examples in {path}: the CSV file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise PerdiagError(f"cannot read {path} as CSV: {str(err).strip().splitlines()[0]}") from err
    if frame.shape[0] == 0:
        raise PerdiagError(f"no examples in {path}: the CSV has a header but no rows")
    if frame.shape[1] == 1 and any(sep in str(frame.columns[0]) for sep in ";\t|"):
        raise PerdiagError(
            f"{path.name} reads as one column {str(frame.columns[0])[:60]!r}...: perdiag reads comma-separated CSV; "
            "re-save it with commas (DataFrame.to_csv does)"
        )
    first = frame.columns[0] if len(frame.columns) else None
    if first == "Unnamed: 0" and frame[first].equals(pd.Series(range(len(frame)))):
        # DataFrame.to_csv's default index column (0, 1, ..., n-1, no name): row numbers, not a feature.
        frame = frame.drop(columns=first)
        notes.append(f"{path.name}: dropped the unnamed first column 0..{len(frame) - 1} (a pandas index)")
    targets = None
    if target_column is None:
        lowered = {str(name).lower(): name for name in frame.columns}
        target_column = next((lowered[name] for name in TARGET_KEYS if name in lowered), None)
        if target_column is not None:
            notes.append(f"targets: the CSV column {target_column!r} (not a model input)")
    if target_column is not None:
        if target_column not in frame.columns:
            names = [str(name) for name in frame.columns]
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise PerdiagError(f"target column {target_column!r} not in {path.name}; columns: {shown}")
        column = frame.pop(target_column)
        if not pd.api.types.is_numeric_dtype(column):
            raise PerdiagError(f"target column {target_column!r} in {path.name} is not numeric; encode classes as integers")
        if column.isna().any():
            raise PerdiagError(f"target column {target_column!r} in {path.name} has missing values")
        values = column.to_numpy()
        integral = values.dtype.kind in "biu" or bool(np.all(np.equal(np.mod(values, 1), 0)))
        targets = torch.from_numpy(values.astype(np.int64 if integral else np.float32))

    if frame.shape[1] == 0:
        raise PerdiagError(f"no examples in {path}: the CSV has no input columns besides the targets")
    non_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise PerdiagError(
            f"non-numeric columns in {path.name}: {', '.join(non_numeric[:10])}; drop them or encode them as numbers"
            + ("" if target_column else " (use --target-column for a label column)")
        )
    with_gaps = [str(c) for c in frame.columns if frame[c].isna().any()]
    if with_gaps:
        raise PerdiagError(f"missing values in columns of {path.name}: {', '.join(with_gaps[:10])}; fill or drop them")
    inputs = torch.from_numpy(frame.to_numpy(dtype=np.float32))
    notes.append(f"x: {frame.shape[1]} numeric CSV columns as float32 features")
    return Examples((inputs,), targets=targets, notes=notes, source=str(path))


def _first_csv_line(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        return next(csv.reader(handle), [])


def _reads_as_data(names: Sequence[Any]) -> bool:
    """Whether a CSV header line is really a row of numbers, i.e. the file has no header.

    Numbered columns 0..k-1 or 1..k (what ``pandas.DataFrame(array).to_csv`` writes) are a header.
    """
    values = []
    for name in names:
        try:
            values.append(float(str(name)))
        except ValueError:
            return False
    k = len(values)
    return k > 0 and values != [float(i) for i in range(k)] and values != [float(i) for i in range(1, k + 1)]

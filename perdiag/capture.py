"""Which layers to watch, what a layer's output is, and the forward hooks that hand it over.

This module is the one place where perdiag decides these things; ``inspect`` and training both use it.

* :func:`select_layers` picks (qualified name, module) pairs by default set, glob and class name.
* :func:`extract_output` is the output rule: which tensor of a module's return value is "the
  activation" (first tensor of a tuple, ``last_hidden_state`` of a mapping, ...).
* :class:`ActivationCapture` hooks the selected modules, lays every output out as (samples, units)
  with :mod:`perdiag.layout`, and calls back synchronously.
* :func:`describe_layers` runs one forward with hooks on every module, for ``--list-layers``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from perdiag.errors import PerdiagError
from perdiag.layout import LAYOUTS, layout_for_module, to_samples, units_last

#: Modules whose output is a nonlinearity's: the default selection for PER training.
NONLINEARITY_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.GLU,
)

#: Name given to the model itself when it has no submodules and is the only layer.
ROOT_NAME = "(root)"

#: Field preference of the output rule for mappings and dataclasses (Hugging Face ``ModelOutput``).
OUTPUT_FIELDS: tuple[str, ...] = ("last_hidden_state", "hidden_states", "logits", "output")

#: Modules that act on the last axis: their output does not inherit their input's layout.
_LAST_AXIS_MODULES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.MultiheadAttention, nn.RNNBase)

_MAX_LISTED = 10

ActivationCallback = Callable[[str, nn.Module, torch.Tensor, tuple[int, ...]], None]


# -- layer selection ------------------------------------------------------------------------------


def _named_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All modules in ``named_modules()`` order; the root only when it has no children."""
    named = [(name, module) for name, module in model.named_modules() if name]
    return named or [(ROOT_NAME, model)]


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__.lower() for cls in type(module).__mro__ if issubclass(cls, nn.Module)}


def select_layers(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
    default: str = "leaves",
) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs to watch, in ``model.named_modules()`` order.

    Without ``patterns`` and ``types`` the ``default`` set is used: ``"leaves"`` (every module without
    children; the capture later skips those whose output is not a floating tensor) or
    ``"nonlinearities"`` (instances of :data:`NONLINEARITY_TYPES`, training's default). With them,
    every module (containers too) is a candidate and must match at least one glob of ``patterns``
    (``fnmatch`` on the qualified name, e.g. ``"encoder.layers.*.linear2"``) AND, when ``types`` is
    given, one of the class names in ``types`` (case-insensitive, matched against the class and its
    base classes, e.g. ``"Conv2d"`` or ``"_ConvNd"``). The root module is a candidate only when it
    has no children, under the name :data:`ROOT_NAME`. Each module appears once, under its first name.

    Raises:
        PerdiagError: unknown ``default``, a type name that is neither a class in the model nor in
            ``torch.nn``, or nothing selected (the message lists available names and types).
    """
    if default not in ("leaves", "nonlinearities"):
        raise PerdiagError(f"unknown default layer set {default!r}; choose 'leaves' or 'nonlinearities'")
    patterns = [p.strip() for p in patterns or () if p.strip()]
    # Matched case-insensitively, reported as the user wrote them.
    spelled = {t.strip().lower(): t.strip() for t in types or () if t.strip()}
    wanted_types = set(spelled)
    candidates = _named_candidates(model)

    if wanted_types:
        known = set().union(*(_type_names(module) for _, module in candidates))
        known |= {name.lower() for name, value in vars(nn).items() if isinstance(value, type)}
        unknown = sorted(spelled[t] for t in wanted_types if t not in known)
        if unknown:
            in_model = sorted({type(module).__name__ for _, module in candidates})
            raise PerdiagError(
                f"unknown layer type(s) {', '.join(unknown)}; types in this model: "
                f"{_listing(in_model)} (see perdiag inspect MODEL --list-layers)"
            )

    if patterns or wanted_types:
        selected = [
            (name, module)
            for name, module in candidates
            if (not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns))
            and (not wanted_types or _type_names(module) & wanted_types)
        ]
        what = " and ".join(
            part
            for part in (
                f"patterns {', '.join(map(repr, patterns))}" if patterns else "",
                f"types {', '.join(sorted(spelled.values()))}" if wanted_types else "",
            )
            if part
        )
    elif default == "leaves":
        selected = [(name, module) for name, module in candidates if not any(True for _ in module.children())]
        what = "the default (leaf modules)"
    else:
        selected = [(name, module) for name, module in candidates if isinstance(module, NONLINEARITY_TYPES)]
        what = (
            "the default (nonlinearity modules such as nn.ReLU; functional calls like F.relu cannot be "
            "hooked)"
        )

    if not selected:
        names = [name for name, _ in candidates]
        type_list = sorted({type(module).__name__ for _, module in candidates})
        raise PerdiagError(
            f"no layers match {what}; layers: {_listing(names)}; types: {_listing(type_list)}. "
            "perdiag inspect MODEL --list-layers shows them all"
        )
    return selected


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "") if items else "(none)"


# -- the output rule ------------------------------------------------------------------------------


def _extract(output: object) -> tuple[torch.Tensor | None, str]:
    """The activation tensor of a module's return value, or None and the reason why not."""
    if isinstance(output, PackedSequence):
        return _floating(output.data)
    if isinstance(output, torch.Tensor):
        return _floating(output)
    if isinstance(output, (tuple, list)):
        for element in output:
            if isinstance(element, (torch.Tensor, PackedSequence)):
                return _extract(element)
        return None, f"{type(output).__name__} output holds no tensor"
    if isinstance(output, Mapping):
        fields = {str(key): value for key, value in output.items()}
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = {f.name: getattr(output, f.name, None) for f in dataclasses.fields(output)}
    else:
        return None, f"output is a {type(output).__name__}, not a tensor"
    for name in OUTPUT_FIELDS:
        if isinstance(fields.get(name), torch.Tensor):
            return _floating(fields[name])
    for value in fields.values():
        if isinstance(value, torch.Tensor):
            return _floating(value)
    return None, f"{type(output).__name__} output holds no tensor"


def _floating(tensor: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    if tensor.is_nested:
        return None, "output is a nested tensor (ragged rows have no (samples, units) layout)"
    if tensor.is_floating_point():
        return tensor, ""
    return None, f"output is a {str(tensor.dtype).removeprefix('torch.')} tensor, not floating point"


def extract_output(output: object) -> torch.Tensor | None:
    """The output rule: which tensor of a module's return value is its activation.

    * a tensor: itself;
    * a tuple or list: its first element that is a tensor (or PackedSequence), skipping ``None``; so
      ``nn.LSTM``'s ``(out, (h, c))`` gives ``out``;
    * a mapping (``dict``, Hugging Face ``ModelOutput``) or a dataclass instance: the first of the
      fields ``last_hidden_state``, ``hidden_states``, ``logits``, ``output`` that holds a tensor,
      else the first tensor-valued field;
    * a ``PackedSequence``: its ``.data``, (total steps, features);
    * anything else: None.

    Returns None as well when the chosen tensor is not floating point (token ids, boolean masks).
    """
    return _extract(output)[0]


# -- hooks ----------------------------------------------------------------------------------------


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, PackedSequence):
            return arg.data
    return None


class ActivationCapture:
    """Context manager: forward hooks on ``layers`` that hand each output to ``on_activation``.

    For every call of a selected module (a module called twice per forward reports twice), the
    output goes through :func:`extract_output`; if it yields a floating tensor ``out``,
    ``on_activation(name, module, samples, tuple(out.shape))`` is called with
    ``samples = to_samples(out, layout)``, a 2-D (samples, units) view or copy of ``out``.

    Layout. With ``layout="auto"`` each output's layout is :func:`perdiag.layout.layout_for_module`
    of its module, given the layout inherited from the module that produced its first input, when
    that module is hooked too, the shape is unchanged and the module does not act on the last axis
    (``nn.Linear`` and the like): so a ReLU after a Conv1d is read channels-first. Pass ``model`` to
    let its unselected leaf modules pass layouts on as well (hooks that only record a layout; they
    are not counted and call nothing). An explicit
    ``"channels_first"`` / ``"channels_last"`` applies to every output.

    The callback runs synchronously inside the hook, before the next module runs, so it sees the
    values before any later in-place operation (``nn.ReLU(inplace=True)``) overwrites them. A callback
    that keeps ``samples`` beyond its own return must copy it (``samples.clone()``): for 2-D outputs
    ``samples`` shares memory with the module's output.

    With ``detach=True`` (inspection) ``samples`` carries no autograd graph; with ``detach=False``
    (training) it does, so a loss built from it back-propagates into the model.

    With ``flatten=False`` the callback gets ``samples = units_last(out, layout)`` instead: the
    (..., n_units) view with units on the last axis and every leading axis a sample axis, never a
    copy (a channels-first (B, C, H, W) output arrives as its (B, H, W, C) ``movedim`` view), so a
    consumer that pools all values or keeps a few rows (inspect's
    :class:`~perdiag.stream.LayerAccumulator`) avoids the layout copy. ``samples.reshape(-1,
    n_units)`` is what the default ``flatten=True`` passes.

    Hooks are registered on ``__enter__`` and removed on every exit, including exceptions, which
    propagate (``__exit__`` returns False). After (and during) the block:

    * ``calls[name]``: number of calls seen, including skipped ones;
    * ``shapes[name]``: the shape of the last captured output;
    * ``skipped[name]``: why the last uncaptured output of that layer was not captured.
    """

    def __init__(
        self,
        layers: list[tuple[str, nn.Module]],
        on_activation: ActivationCallback,
        *,
        layout: str = "auto",
        detach: bool = True,
        model: nn.Module | None = None,
        flatten: bool = True,
    ) -> None:
        if layout not in LAYOUTS:
            raise PerdiagError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        seen: set[int] = set()
        self.layers: list[tuple[str, nn.Module]] = []
        for name, module in layers:
            if id(module) not in seen:  # one hook per module, or a shared module would report twice
                seen.add(id(module))
                self.layers.append((name, module))
        self.on_activation = on_activation
        self.layout = layout
        self.detach = detach
        self.flatten = flatten
        # Leaves of ``model`` that are not selected get tracking-only hooks, so that the layout of a
        # Conv1d output still reaches a selected ReLU two modules later.
        self._tracked = [
            module
            for _, module in (_named_candidates(model) if model is not None and layout == "auto" else [])
            if id(module) not in seen and not any(True for _ in module.children())
        ]
        # Only 1-D conv/norm/pool modules ever make "auto" mean channels-first; in a model without
        # one every output is read "auto", and tracking layouts (a hook on every leaf) is skipped.
        scope = model.modules() if model is not None else (m for _, top in self.layers for m in top.modules())
        self._inherits = layout == "auto" and any(layout_for_module(m) == "channels_first" for m in scope)
        if not self._inherits:
            self._tracked = []
        self.calls: dict[str, int] = {name: 0 for name, _ in self.layers}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.skipped: dict[str, str] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fastpath: bool | None = None  # the transformer fast-path setting to restore
        # id(output tensor) -> (weak reference, layout): weak so ids of freed tensors are never trusted.
        self._produced: dict[int, tuple[weakref.ref, str]] = {}
        self._prune_at = 64

    def __enter__(self) -> ActivationCapture:
        # PyTorch's transformer fast path (eval, no grad) runs a whole nn.TransformerEncoderLayer as
        # one fused op, so hooks on its submodules never fire, and it packs padded batches into
        # nested tensors that have no plain shape. Off while capturing: every module really runs.
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for name, module in self.layers:
                hook = self._make_hook(name)
                self._handles.append(module.register_forward_hook(hook))
            for module in self._tracked:
                self._handles.append(module.register_forward_hook(self._track))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Remove every hook and restore the transformer fast-path setting (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._produced.clear()
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._on_output(name, module, args, output)

        return hook

    def _on_output(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        self.calls[name] += 1
        out, reason = _extract(output)
        if out is None or out.ndim == 0:
            self.skipped[name] = reason or "output is a 0-dim tensor"
            return
        layout = self._resolve_layout(module, args, out)
        if self.detach:
            out = out.detach()
        shape = tuple(out.shape)
        self.shapes[name] = shape
        self.on_activation(name, module, to_samples(out, layout) if self.flatten else units_last(out, layout), shape)

    def _track(self, module: nn.Module, args: tuple, output: object) -> None:
        """Hook on unselected modules: only passes the layout on to the modules that follow."""
        out, _ = _extract(output)
        if out is not None and out.ndim > 0:
            self._resolve_layout(module, args, out)

    def _resolve_layout(self, module: nn.Module, args: tuple, out: torch.Tensor) -> str:
        if not self._inherits:
            return self.layout
        # A container (or an in-place / identity module) returns a tensor a hooked module already
        # produced: its layout is known. Otherwise the output may inherit its input's layout.
        known = self._known_layout(out)
        layout = layout_for_module(module, known or self._inherited(module, args, out))
        self._remember(out, layout)
        return layout

    def _known_layout(self, tensor: torch.Tensor) -> str | None:
        entry = self._produced.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def _inherited(self, module: nn.Module, args: tuple, out: torch.Tensor) -> str | None:
        source = _first_tensor(args)
        if source is None or isinstance(module, _LAST_AXIS_MODULES) or source.shape != out.shape:
            return None
        return self._known_layout(source)

    def _remember(self, out: torch.Tensor, layout: str) -> None:
        # Entries of freed tensors are dropped whenever the table doubles: its size follows the
        # number of hooked outputs still alive (one forward's worth, or a few while graphs are kept).
        if len(self._produced) >= self._prune_at:
            self._produced = {key: entry for key, entry in self._produced.items() if entry[0]() is not None}
            self._prune_at = max(64, 2 * len(self._produced))
        self._produced[id(out)] = (weakref.ref(out), layout)


# -- helpers for the CLI --------------------------------------------------------------------------


def set_eval(model: nn.Module) -> nn.Module:
    """Put ``model`` and every submodule in eval mode and return it.

    This changes behaviour, not just a flag: dropout stops dropping and batch norm uses its running
    statistics instead of the batch's, in every submodule. Statistics of a model in train mode
    describe a different function.
    """
    model.eval()
    return model


def describe_layers(model: nn.Module, batch_call: Callable[[], object]) -> list[dict]:
    """One row per module for ``--list-layers``, from ONE forward (``batch_call()``) under no_grad.

    Rows, in ``named_modules()`` order (the root only if it has no children): ``name``, ``type``
    (class name), ``output_shape`` (a tuple; ``"-"`` if the module was not called, or the reason its
    output is not captured), ``n_units`` (units under the layout rule as :class:`ActivationCapture`
    applies it, None if not captured), ``n_params`` (the module's parameters with its children's, each
    shared parameter once, as ``sum(p.numel() for p in module.parameters())``) and
    ``depth`` (1 for top-level modules, 0 for a childless root).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise PerdiagError(
            "--list-layers needs per-module hooks, which TorchScript models do not accept; inspect reports "
            "such a model's output only (load the eager model with a state dict + --arch for its layers)"
        )
    candidates = _named_candidates(model)
    units: dict[str, int] = {}

    def record(name: str, module: nn.Module, samples: torch.Tensor, shape: tuple[int, ...]) -> None:
        units[name] = int(samples.shape[1])

    capture = ActivationCapture(candidates, record, detach=True)
    with capture, torch.no_grad():
        batch_call()
    rows = []
    for name, module in candidates:
        if name in capture.shapes:
            shape: object = capture.shapes[name]
        else:
            shape = capture.skipped.get(name, "-")
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "output_shape": shape,
                "n_units": units.get(name),
                "n_params": sum(p.numel() for p in module.parameters()),
                "depth": 0 if name == ROOT_NAME else name.count(".") + 1,
            }
        )
    return rows

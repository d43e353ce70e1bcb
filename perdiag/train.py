"""Fine-tuning with the PER regulariser (Joo et al., ICLR 2020), or L1/L2 activation penalties.

The objective of one step on a batch is

    loss = task(model(x), y) + lambda * sum_l R(h_l),

where ``task`` is cross-entropy (classification, class axis last) or MSE (regression), h_l is the
(rows, units) activation of selected layer l laid out by :mod:`perdiag.layout` exactly as ``inspect``
reads it (selection, output rule and layout come from :mod:`perdiag.capture`; default: the outputs
of the non-linearity modules), and R is one of

* ``per``: PER against s directions drawn afresh every step (the paper), on ``per_rows`` rows per
  layer drawn uniformly at random each step (an unbiased estimate of the same loss; 0 = all rows);
* ``l1``: mean |h|; ``l2``: mean h^2 (the paper's activation-penalty baselines), over all rows.

:mod:`perdiag.regularise` computes R and its gradient (seeded draws, row subsets, and how PER's
closed-form gradient enters backward); this module runs the loop around it.

Every epoch reports the mean task loss and regulariser over the epoch's steps, the validation loss
and accuracy, and the validation SW1 and PER of each selected layer computed as ``inspect`` does:
a :class:`perdiag.stream.LayerAccumulator` reservoir (4096 rows, seeded by ``seed``) fed during the
validation pass and :func:`perdiag.diagnose.layer_distances` with a :class:`ProjectionBank` of 256
directions (seeded by ``seed``), the same every epoch; ``val_sw1`` is their mean over the selected
layers. Epoch 0 is the model before training. ``step_time_s`` is the training phase's wall time
divided by its steps (data loading included).

Distributed: under ``torchrun`` (see :mod:`perdiag.distributed`) every rank takes ``batch_size /
world_size`` examples of each global batch (``batch_size`` is the GLOBAL batch) through a
``DistributedSampler``; PER is computed on each rank's own activations and DDP averages gradients,
which equals the single-process gradient of the global batch when the shards have equal size and
``per_rows = 0``. A single process uses the same sampler (one replica), so both see the same global
batches. When the ranks do not divide the examples, DistributedSampler repeats up to world_size - 1
of them per epoch so that shards stay equal. Validation runs on every rank over the whole
validation set (identical results); only rank 0 writes files and prints.

Checkpoints and Ctrl-C. The output is written once, atomically, when training ends; a failed run
writes nothing. The first Ctrl-C is honoured at the next step boundary (all ranks agree on it):
the weights, optimizer state, RNG state and the position in the epoch of the last completed step
are saved to ``--out`` (or ``<out>_interrupted.pt`` when ``--out`` exists and is not the checkpoint
being resumed), and ``--resume`` continues from there, reproducing an uninterrupted run exactly on
the CPU. A second Ctrl-C raises at once; the checkpoint is still written, but if the signal lands
inside an optimizer update, that update may be half applied.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from perdiag.capture import ActivationCapture, extract_output, select_layers, set_eval
from perdiag.checkpoints import LoadedModel, build_model, save_checkpoint
from perdiag.data import Examples, iter_batches, load_examples, make_loader
from perdiag.diagnose import InspectSettings, ProjectionBank, layer_distances
from perdiag.distributed import DistContext, wrap_model
from perdiag.errors import PerdiagError
from perdiag.failures import name_failing_layer
from perdiag.files import atomic_path
from perdiag.layout import LAYOUTS
from perdiag.per import DEFAULT_PROJECTIONS
from perdiag.regularise import REGULARISERS, StepRegulariser, backward_with_penalty
from perdiag.stream import LayerAccumulator

TASKS: tuple[str, ...] = ("classification", "regression")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
#: Rows per layer and step for PER (0 = all); see the module docstring.
DEFAULT_PER_ROWS = 32
#: Validation SW1 is computed exactly as ``inspect`` computes it, with inspect's defaults.
SW1_PROJECTIONS = InspectSettings.n_projections
SW1_MAX_SAMPLES = InspectSettings.max_samples
_VAL_BATCH = 256
#: Columns of the per-epoch metrics table besides the per-layer ``sw1/<layer>`` and ``per/<layer>``.
METRIC_COLUMNS: tuple[str, ...] = (
    "epoch", "steps", "train_task_loss", "train_reg", "train_loss", "val_loss", "val_accuracy",
    "val_sw1", "val_per", "step_time_s",
)
#: Options a resumed run may change; everything else must match the saved configuration.
RESUME_MAY_CHANGE = ("epochs",)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint as ``train_config``).

    ``batch_size`` is the global batch (split over DDP ranks). ``per_weight`` is lambda for whichever
    regulariser ``reg`` names. ``data`` / ``val_data`` are absolute paths, or None when the caller
    hands examples in directly.
    """

    per_weight: float
    reg: str = "per"
    task: str = "classification"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    projections: int = DEFAULT_PROJECTIONS
    per_rows: int = DEFAULT_PER_ROWS
    layers: list[str] | None = None
    types: list[str] | None = None
    layout: str = "auto"
    seed: int = 0
    data: str | None = None
    val_data: str | None = None
    target_column: str | None = None

    def check(self) -> TrainConfig:
        """Raise PerdiagError for a value no run can use; returns self."""
        problems = []
        if not (isinstance(self.per_weight, (int, float)) and math.isfinite(self.per_weight) and self.per_weight >= 0):
            problems.append(f"--per-weight must be a finite number >= 0 (0 disables the regulariser), got {self.per_weight}")
        if self.reg not in REGULARISERS:
            problems.append(f"--reg must be one of {', '.join(REGULARISERS)}, got {self.reg!r}")
        if self.task not in TASKS:
            problems.append(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.projections < 1:
            problems.append(f"--projections must be at least 1, got {self.projections}")
        if self.per_rows < 0:
            problems.append(f"--per-rows must be >= 0 (0 = all rows), got {self.per_rows}")
        if self.layout not in LAYOUTS:
            problems.append(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if problems:
            raise PerdiagError("; ".join(problems))
        return self

    @property
    def regularised(self) -> bool:
        return self.per_weight > 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# -- task loss and target checks ------------------------------------------------------------------


def prediction(output: object) -> torch.Tensor:
    """The model's prediction tensor (the output rule of :func:`perdiag.capture.extract_output`)."""
    tensor = extract_output(output)
    if tensor is None or tensor.ndim < 2:
        raise PerdiagError(
            f"the model returned {type(output).__name__}"
            + (f" of shape {tuple(tensor.shape)}" if tensor is not None else "")
            + "; train needs a floating (batch, ...) prediction tensor"
        )
    return tensor


def task_loss(output: object, targets: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (class axis last, targets = the other axes) or MSE of ``output`` against ``targets``."""
    predicted = prediction(output)
    if task == "classification":
        logits = predicted.reshape(-1, predicted.shape[-1]).float()
        return F.cross_entropy(logits, targets.reshape(-1).long(), reduction=reduction)
    if predicted.shape != targets.shape and predicted.shape[-1] == 1 and predicted.shape[:-1] == targets.shape:
        predicted = predicted.squeeze(-1)
    return F.mse_loss(predicted.float(), targets.float(), reduction=reduction)


def check_targets(examples: Examples, per_example_output: tuple[int, ...], task: str, where: str) -> None:
    """Raise PerdiagError unless ``examples``' targets fit a model output of shape (batch, *per_example_output)."""
    targets = examples.targets
    if targets is None:
        raise PerdiagError(
            f"{where} has no targets; train needs inputs and targets: an (inputs, targets) tuple, a dict with "
            "'y'/'labels'/'targets', an .npz with 'y', or a CSV with --target-column"
        )
    per_example = tuple(targets.shape[1:])
    output_text = f"({', '.join(str(s) for s in per_example_output)})"
    if task == "classification":
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise PerdiagError(
                f"targets of {where} are {str(targets.dtype).removeprefix('torch.')}; --task classification needs "
                "integer class labels (use --task regression for real-valued targets)"
            )
        n_classes = per_example_output[-1]
        if per_example != per_example_output[:-1]:
            column = per_example == (*per_example_output[:-1], 1)
            raise PerdiagError(
                f"targets of {where} have shape {per_example} per example, but the model outputs {output_text} "
                f"per example ({n_classes} classes on the last axis): labels must have shape {per_example_output[:-1]}"
                + ("; save them without the trailing axis of size 1 (y.squeeze(-1))" if column else "")
            )
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= n_classes:
            bad = high if high >= n_classes else low
            raise PerdiagError(
                f"label {bad} in {where} does not fit the model's {n_classes} outputs (labels must be 0..{n_classes - 1}); "
                "check --data or the model"
            )
        return
    fits = per_example == per_example_output or (per_example_output[-1:] == (1,) and per_example == per_example_output[:-1])
    if not fits:
        raise PerdiagError(
            f"regression targets of {where} have shape {per_example} per example but the model outputs "
            f"{output_text} per example; they must match"
        )
    if not torch.isfinite(targets.float()).all():
        raise PerdiagError(f"targets of {where} contain NaN or inf")


def probe_output_shape(model: nn.Module, examples: Examples, device: torch.device) -> tuple[int, ...]:
    """Per-example shape of the model's prediction, from one no-grad forward of two examples (eval mode)."""
    batch = next(iter_batches(examples, 2, 1)).to(device)
    was_training = model.training
    set_eval(model)
    try:
        with torch.no_grad(), name_failing_layer(model):
            return tuple(prediction(batch.call(model)).shape[1:])
    finally:
        model.train(was_training)


# -- validation -----------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    examples: Examples,
    layers: list[tuple[str, nn.Module]],
    config: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Validation loss, accuracy (classification) and per-layer SW1 / PER, computed as ``inspect`` does.

    The model is in eval mode for the pass (and back in train mode afterwards). Returns ``val_loss``,
    ``val_accuracy`` (NaN for regression), ``val_sw1`` and ``val_per`` (means over the layers that
    produced an output), and ``sw1/<layer>``, ``per/<layer>`` for each of them.
    """
    set_eval(model)
    accumulators: dict[str, LayerAccumulator] = {}

    def consume(name: str, module: nn.Module, samples: torch.Tensor, shape: tuple[int, ...]) -> None:
        if name not in accumulators:
            accumulators[name] = LayerAccumulator(samples.shape[1], max_samples=SW1_MAX_SAMPLES, seed=config.seed)
        accumulators[name].update(samples)

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    capture = ActivationCapture(layers, consume, layout=config.layout, detach=True, model=model)
    try:
        with torch.no_grad(), capture:
            for batch in iter_batches(examples, max(config.batch_size, _VAL_BATCH)):
                batch = batch.to(device)
                output = batch.call(model)
                loss_sum += task_loss(output, batch.targets, config.task, reduction="sum").double()
                if config.task == "classification":
                    predicted = prediction(output)
                    correct += (predicted.argmax(dim=-1) == batch.targets).sum().double()
                    count += batch.targets.numel()
                else:
                    count += len(batch)
    finally:
        model.train()
    # MSE's "sum" adds every element; divide by elements so val_loss matches the training mean.
    elements = examples.targets.numel() if config.task == "regression" else count
    row: dict[str, float] = {
        "val_loss": float(loss_sum) / max(elements, 1),
        "val_accuracy": float(correct) / count if config.task == "classification" else math.nan,
    }
    bank = ProjectionBank(SW1_PROJECTIONS, config.seed)
    sw1, per = [], []
    for name, _ in layers:
        if name not in accumulators:
            continue
        reservoir = accumulators[name].result().reservoir
        distances = layer_distances(reservoir, bank(reservoir.shape[1]))
        row[f"sw1/{name}"] = distances["sw1"]
        row[f"per/{name}"] = distances["per"]
        sw1.append(distances["sw1"])
        per.append(distances["per"])
    row["val_sw1"] = float(np.mean(sw1)) if sw1 else math.nan
    row["val_per"] = float(np.mean(per)) if per else math.nan
    return row


# -- the run --------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress of a run: what a resumed run continues from (stored as ``train_state``).

    ``epoch`` counts completed epochs; ``step_in_epoch`` the completed steps of the current one;
    the sums are the current epoch's (over all ranks when saved).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    task_sum: float = 0.0
    reg_sum: float = 0.0
    n_examples: float = 0.0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainPlan:
    """A run ready to start: the model, its data, the configuration and where results go."""

    loaded: LoadedModel
    train: Examples
    val: Examples
    config: TrainConfig
    out: Path
    metadata: dict
    layers: list[tuple[str, nn.Module]]
    resume_from: dict | None = None  #: the checkpoint dict of ``--resume``
    resume_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None


@dataclass
class TrainResult:
    """A finished run: the trained model (unwrapped), per-epoch metrics and the checkpoint written."""

    model: nn.Module
    metrics: pd.DataFrame
    state: TrainState
    checkpoint: Path | None


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training; a resumable checkpoint was written to ``checkpoint``."""

    def __init__(
        self, checkpoint: Path, epoch: int, step_in_epoch: int, global_step: int, metrics: pd.DataFrame | None = None
    ) -> None:
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step_in_epoch = step_in_epoch
        self.global_step = global_step
        #: The per-epoch metrics of the epochs finished before the interruption (epoch 0 included).
        self.metrics = metrics
        super().__init__(
            f"interrupted after {global_step} steps (epoch {epoch + 1}, step {step_in_epoch}); saved a resumable "
            f"checkpoint at the last completed step: {checkpoint}; continue with: perdiag train --resume {checkpoint}"
        )


def default_out(model_path: Path, config: TrainConfig) -> Path:
    """``<model stem>_<reg>.pt`` (``_ft`` when lambda is 0) in the current folder."""
    suffix = config.reg if config.regularised else "ft"
    return Path.cwd() / f"{model_path.stem}_{suffix}.pt"


def _absolute(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _check_writable_source(loaded: LoadedModel) -> None:
    """perdiag checkpoints name an importable architecture; refuse models that have none."""
    if loaded.source == "torchscript":
        raise PerdiagError(
            f"{loaded.path.name} is a TorchScript archive; train writes perdiag checkpoints, which rebuild the model "
            "from an importable class. Save its state_dict() and pass --arch package.module:Class instead"
        )
    if loaded.source == "pickled_module":
        try:
            rebuilt = build_model(loaded.arch, {}, require_module_class=True)
            rebuilt.load_state_dict(loaded.model.state_dict())
        except Exception as err:  # noqa: BLE001 - any failure means it cannot be rebuilt from its import path
            raise PerdiagError(
                f"{loaded.path.name} is a pickled module whose class {loaded.arch} cannot be rebuilt from its import "
                "path without arguments; train writes perdiag checkpoints, so save its state_dict() and pass --arch "
                "(and --arch-kwargs)"
            ) from err
        loaded.arch_kwargs = {}
        loaded.notes.append(f"pickled module: the output names {loaded.arch} with no keyword arguments")


def plan_run(
    model: str | os.PathLike | None,
    *,
    options: Mapping[str, Any],
    resume: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    arch: str | None = None,
    arch_kwargs: str | dict | None = None,
    strict: bool = True,
    trust_checkpoint: bool = False,
    device: str = "cpu",
) -> TrainPlan:
    """Load the model and data, settle the configuration, check targets; nothing is trained or written.

    ``options`` holds :class:`TrainConfig` fields the user gave (None = not given; ``data``,
    ``val_data`` and ``target_column`` included). A fresh run needs ``model`` and ``per_weight``;
    data default to the checkpoint's ``sample_data`` train / val splits and the task to its
    metadata's ``task``. With ``resume`` the saved configuration is used; options may only change
    ``epochs`` (to train further), anything else that differs is an error.
    """
    from perdiag import workflow

    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
    for key in ("data", "val_data"):
        if key in given:
            given[key] = _absolute(given[key])
    notes: list[str] = []

    if resume is not None:
        loaded = workflow.open_model(resume, strict=strict, device=device)
        saved = loaded.checkpoint or {}
        if "train_config" not in saved or "train_state" not in saved:
            raise PerdiagError(
                f"{Path(resume).name} was not written by perdiag train, so there is no run to resume; "
                "start a new run with: perdiag train MODEL --per-weight LAMBDA"
            )
        if model is not None:
            notes.append(f"--resume: the model comes from {Path(resume).name}; {Path(model).name} is not read")
        config = TrainConfig.from_dict(saved["train_config"])
        for key, value in given.items():
            current = getattr(config, key)
            if key in RESUME_MAY_CHANGE:
                setattr(config, key, value)
            elif _differs(current, value):
                flag = "--" + key.replace("_", "-")
                raise PerdiagError(
                    f"{flag} {value} differs from the run being resumed ({current}); --resume continues the same "
                    f"configuration (only {', '.join('--' + k for k in RESUME_MAY_CHANGE)} may change): drop {flag} "
                    "or start a new run"
                )
        config.check()
        state = TrainState.from_dict(saved["train_state"])
        if state.epoch >= config.epochs:
            raise PerdiagError(
                f"the run in {Path(resume).name} already completed {state.epoch} epoch{'s' if state.epoch != 1 else ''}; "
                f"pass --epochs N with N > {state.epoch} (the total, not a number of extra epochs) to train further"
            )
        out_path = Path(out) if out is not None else Path(resume)
        metadata = dict(loaded.metadata)
    else:
        if model is None:
            raise PerdiagError("pass a MODEL checkpoint to fine-tune, or --resume CKPT to continue a run")
        if "per_weight" not in given:
            raise PerdiagError(
                "pass --per-weight LAMBDA: the regulariser's weight (the paper used 1e-4 .. 3e-4 for CNNs; "
                "0 fine-tunes without it)"
            )
        loaded = workflow.open_model(
            model, arch=arch, arch_kwargs=arch_kwargs, strict=strict, trust_checkpoint=trust_checkpoint, device=device
        )
        _check_writable_source(loaded)
        given.setdefault("task", loaded.metadata.get("task") or "classification")
        sample_data = loaded.metadata.get("sample_data") or {}
        if "data" not in given:
            if not sample_data.get("train"):
                raise PerdiagError(
                    f"{Path(model).name} names no training data (metadata sample_data.train); pass --data FILE with "
                    "inputs and targets"
                )
            given["data"] = sample_data["train"]
        if "val_data" not in given:
            # The checkpoint's val split belongs with its train split, not with a user's --data.
            if options.get("data") is None and sample_data.get("val"):
                given["val_data"] = sample_data["val"]
            else:
                given["val_data"] = given["data"]
                notes.append("no --val-data: validation metrics are computed on the training data")
        config = TrainConfig(**given).check()
        out_path = Path(out) if out is not None else default_out(Path(model), config)
        if out_path.expanduser().resolve() == Path(model).expanduser().resolve():
            raise PerdiagError(f"--out {out_path} is the input checkpoint; choose another output path")
        metadata = dict(loaded.metadata)
        metadata["fine_tuned_from"] = str(Path(model).expanduser().resolve())
        metadata["task"] = config.task
        metadata["sample_data"] = {"train": config.data, "val": config.val_data}

    if out_path.suffix.lower() not in (".pt", ".pth", ".ckpt"):
        raise PerdiagError(f"--out must end in .pt, .pth or .ckpt (a perdiag checkpoint), got {out_path.name}")
    for label, path in (("--data", config.data), ("--val-data", config.val_data)):
        if path is None or not Path(path).exists():
            raise PerdiagError(f"{label} file {path} is missing; pass --data / --val-data")
    train_examples = load_examples(config.data, target_column=config.target_column)
    val_examples = (
        train_examples if config.val_data == config.data else load_examples(config.val_data, target_column=config.target_column)
    )
    layers = select_layers(loaded.model, config.layers, config.types, default="nonlinearities")
    device_obj = next((p.device for p in loaded.model.parameters()), torch.device("cpu"))
    per_example = probe_output_shape(loaded.model, train_examples, device_obj)
    check_targets(train_examples, per_example, config.task, Path(config.data).name)
    if val_examples is not train_examples:
        check_targets(val_examples, per_example, config.task, Path(config.val_data).name)
    return TrainPlan(
        loaded=loaded,
        train=train_examples,
        val=val_examples,
        config=config,
        out=out_path,
        metadata=metadata,
        layers=layers,
        resume_from=loaded.checkpoint if resume is not None else None,
        resume_path=Path(resume) if resume is not None else None,
        notes=notes + list(loaded.notes),
    )


def _differs(current: Any, value: Any) -> bool:
    if isinstance(current, float) or isinstance(value, float):
        try:
            return not math.isclose(float(current), float(value), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return True
    if isinstance(current, (list, tuple)) or isinstance(value, (list, tuple)):
        return list(current or []) != list(value or [])
    return current != value


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PerdiagError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _InterruptGuard:
    """Turns the first Ctrl-C into a request honoured at the next step boundary (never mid-update).

    All ranks agree on the request with one all-reduce per step, so they stop at the same step. A
    second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread nothing is installed.
    """

    def __init__(self, context: DistContext) -> None:
        self.context = context
        self.requested = False
        self.agreed = False
        self._previous = None

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt when any rank asked to stop."""
        flag = self.requested
        if self.context.active:
            tensor = torch.tensor([1.0 if flag else 0.0], device=self.context.device)
            flag = bool(self.context.all_reduce(tensor, op="max").item())
        if flag:
            self.agreed = True
            raise KeyboardInterrupt


def fit(
    plan: TrainPlan,
    context: DistContext | None = None,
    *,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    save: bool = True,
) -> TrainResult:
    """Train ``plan`` and (on rank 0, with ``save``) write its checkpoint to ``plan.out``.

    ``on_step(k)`` runs after every completed optimizer step, ``on_epoch(row)`` after every
    validation (epoch 0 = before training, unless resuming). A KeyboardInterrupt (Ctrl-C, or raised
    by a callback) saves a resumable checkpoint of the last completed step and raises
    :class:`TrainingInterrupted`. Nothing is written when training fails otherwise.
    """
    context = context or DistContext(device=next((p.device for p in plan.loaded.model.parameters()), torch.device("cpu")))
    config = plan.config
    device = context.device
    if config.batch_size % context.world_size:
        raise PerdiagError(
            f"--batch-size {config.batch_size} (the global batch) must be divisible by the {context.world_size} processes"
        )
    per_rank = config.batch_size // context.world_size
    model = plan.loaded.model.to(device)
    model.train()
    optimizer = _make_optimizer(model, config)
    state = TrainState()
    if plan.resuming:
        saved = plan.resume_from
        optimizer.load_state_dict(saved["optimizer_state"])
        state = TrainState.from_dict(saved["train_state"])
        if not context.is_main:  # the saved sums are over all ranks: count them once
            state.task_sum = state.reg_sum = state.n_examples = 0.0
        rng = saved.get("rng_state") or {}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        torch.manual_seed(config.seed)
    wrapped = wrap_model(model, context)

    if not state.history:
        row = {"epoch": 0, "steps": 0, **evaluate(model, plan.val, plan.layers, config, device)}
        state.history.append(row)
        if on_epoch is not None:
            on_epoch(row)

    guard = _InterruptGuard(context)
    try:
        with guard:
            while state.epoch < config.epochs:
                _train_epoch(plan, wrapped, model, optimizer, state, context, per_rank, guard, on_step)
                row = _finish_epoch(plan, model, state, context)
                if on_epoch is not None:
                    on_epoch(row)
                guard.check()
    except KeyboardInterrupt:
        if context.active and guard.agreed:
            _reduce_sums(state, context)
        path = _interrupt_path(plan)
        if save and context.is_main:
            save_run(plan, model, optimizer, state, path, finished=False)
        if guard.agreed:
            context.barrier()  # the other ranks wait for rank 0's file before they exit
        raise TrainingInterrupted(
            path, state.epoch, state.step_in_epoch, state.global_step, metrics_frame(state.history)
        ) from None

    written = None
    if save and context.is_main:
        save_run(plan, model, optimizer, state, plan.out, finished=True)
        written = plan.out
    return TrainResult(model=model, metrics=metrics_frame(state.history), state=state, checkpoint=written)


def train_step(
    model: nn.Module,
    batch,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    regulariser: StepRegulariser,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on ``batch`` (already on the device); returns the detached task loss and R.

    With ``config.regularised`` the caller keeps an :class:`~perdiag.capture.ActivationCapture`
    with ``regulariser`` as its callback (``detach=False``) open around this call.
    """
    if config.regularised:
        regulariser.begin_step(step)
    output = batch.call(model)
    task = task_loss(output, batch.targets, config.task)
    loss = task
    reg = regulariser.total if config.regularised else None
    if reg is not None and reg.requires_grad:  # L1/L2; PER's gradient comes as backward roots
        loss = task + config.per_weight * reg
    optimizer.zero_grad(set_to_none=True)
    backward_with_penalty(loss, regulariser if config.regularised else None)
    optimizer.step()
    return task.detach(), (None if reg is None else reg.detach())


def _train_epoch(plan, wrapped, model, optimizer, state, context, per_rank, guard, on_step) -> None:
    config = plan.config
    device = context.device
    sampler = DistributedSampler(
        plan.train, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    sampler.set_epoch(state.epoch)
    order = list(sampler)[state.step_in_epoch * per_rank:]
    if not order:
        return
    loader = make_loader(plan.train, per_rank, sampler=order)
    regulariser = StepRegulariser(
        config.reg, config.projections, config.per_rows, config.seed, context.rank, weight=config.per_weight
    )
    capture = (
        ActivationCapture(plan.layers, regulariser, layout=config.layout, detach=False, model=model, flatten=False)
        if config.regularised
        else contextlib.nullcontext()
    )
    task_sum = torch.zeros((), dtype=torch.float64, device=device)
    reg_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_examples = 0
    started = time.perf_counter()
    try:
        with capture:
            for batch in loader:
                batch = batch.to(device)
                task, reg = train_step(wrapped, batch, optimizer, config, regulariser, state.global_step)
                if reg is not None:
                    reg_sum += reg.double() * len(batch)
                task_sum += task.double() * len(batch)
                n_examples += len(batch)
                state.step_in_epoch += 1
                state.global_step += 1
                if on_step is not None:
                    on_step(1)
                guard.check()
    finally:
        # Completed steps only: an interrupted step raised before reaching the counters above.
        state.train_seconds += time.perf_counter() - started
        state.task_sum += float(task_sum)
        state.reg_sum += float(reg_sum)
        state.n_examples += n_examples


def _reduce_sums(state: TrainState, context: DistContext) -> None:
    sums = torch.tensor([state.task_sum, state.reg_sum, state.n_examples], dtype=torch.float64, device=context.device)
    context.all_reduce(sums)
    state.task_sum, state.reg_sum, state.n_examples = (float(v) for v in sums.cpu())


def _finish_epoch(plan: TrainPlan, model: nn.Module, state: TrainState, context: DistContext) -> dict:
    config = plan.config
    steps = state.step_in_epoch
    _reduce_sums(state, context)
    task = state.task_sum / max(state.n_examples, 1.0)
    reg = state.reg_sum / max(state.n_examples, 1.0) if config.regularised else math.nan
    if not math.isfinite(task) or (config.regularised and not math.isfinite(reg)):
        raise PerdiagError(
            f"the training loss became {task if not math.isfinite(task) else reg} in epoch {state.epoch + 1}; "
            "lower --lr or --per-weight (nothing was written)"
        )
    row = {
        "epoch": state.epoch + 1,
        "steps": state.global_step,
        "train_task_loss": task,
        "train_reg": reg,
        "train_loss": task + (config.per_weight * reg if config.regularised else 0.0),
        "step_time_s": state.train_seconds / max(steps, 1),
        **evaluate(model, plan.val, plan.layers, config, context.device),
    }
    state.history.append(row)
    state.epoch += 1
    state.step_in_epoch = 0
    state.task_sum = state.reg_sum = state.n_examples = state.train_seconds = 0.0
    return row


def _interrupt_path(plan: TrainPlan) -> Path:
    """Where Ctrl-C saves: ``--out`` unless that would replace an existing file other than the resumed one."""
    out = plan.out
    if not out.exists() or (plan.resume_path is not None and out.resolve() == plan.resume_path.resolve()):
        return out
    return out.with_name(f"{out.stem}_interrupted{out.suffix}")


def _relative_sample_data(metadata: dict, folder: Path) -> dict:
    """``sample_data`` paths relative to the checkpoint's folder (how perdiag stores them)."""
    sample_data = metadata.get("sample_data")
    if not isinstance(sample_data, Mapping):
        return metadata
    relative = {}
    for split, path in sample_data.items():
        if isinstance(path, str):
            try:
                path = os.path.relpath(Path(path).resolve(), folder.resolve())
            except ValueError:  # another drive on Windows: keep the absolute path
                path = str(Path(path).resolve())
        relative[split] = path
    return {**metadata, "sample_data": relative}


def save_run(
    plan: TrainPlan, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, path: Path, *, finished: bool
) -> None:
    """Write the perdiag checkpoint of a run (atomically): weights, config, metrics, optimizer and RNG state."""
    path = Path(path)
    metadata = _relative_sample_data(plan.metadata, path.expanduser().parent)
    final = state.history[-1] if state.history else {}
    rng = {"torch": torch.get_rng_state()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_checkpoint(
        path,
        model,
        arch=plan.loaded.arch,
        arch_kwargs=plan.loaded.arch_kwargs,
        metadata=metadata,
        extra={
            "train_config": asdict(plan.config),
            "metrics": {k: v for k, v in final.items() if "/" not in k},
            "metrics_history": state.history,
            "optimizer_state": optimizer.state_dict(),
            "epoch": state.epoch,
            "train_state": {**asdict(state), "finished": finished},
            "rng_state": rng,
        },
    )


# -- outputs --------------------------------------------------------------------------------------


def metrics_frame(history: list[dict]) -> pd.DataFrame:
    """Per-epoch metrics, :data:`METRIC_COLUMNS` first, then ``sw1/<layer>`` and ``per/<layer>``."""
    frame = pd.DataFrame(history)
    for column in METRIC_COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    extra = [c for c in frame.columns if c not in METRIC_COLUMNS]
    return frame.loc[:, list(METRIC_COLUMNS) + extra]


def layer_sw1_table(row: Mapping[str, Any]) -> pd.DataFrame:
    """One metrics row's per-layer SW1 and PER as a (layer, sw1, per) table, for the bar charts."""
    names = [key.removeprefix("sw1/") for key in row if key.startswith("sw1/")]
    return pd.DataFrame(
        {"layer": names, "sw1": [row[f"sw1/{n}"] for n in names], "per": [row.get(f"per/{n}", math.nan) for n in names]}
    )


def run_settings(plan: TrainPlan, context: DistContext | None = None) -> dict:
    """The run's configuration and context, for the HTML report and the console."""
    from perdiag.workflow import versions

    context = context or DistContext()
    return {
        **asdict(plan.config),
        "model": str(plan.metadata.get("fine_tuned_from") or plan.loaded.path),
        "loading": plan.loaded.source,
        "out": str(plan.out),
        "regularised_layers": [name for name, _ in plan.layers],
        "world_size": context.world_size,
        "device": str(context.device),
        "n_projections": SW1_PROJECTIONS,
        "max_samples": SW1_MAX_SAMPLES,
        "val_sw1": f"exact SW1 of up to {SW1_MAX_SAMPLES} rows per layer (uniform reservoir), {SW1_PROJECTIONS} directions, seed {plan.config.seed}",
        **versions(),
    }


def write_metrics(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The per-epoch metrics table as CSV, written atomically."""
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)
    return Path(path)


def write_outputs(
    result: TrainResult,
    settings: Mapping[str, Any],
    *,
    metrics: str | os.PathLike | None = None,
    plots: str | os.PathLike | None = None,
    html: str | os.PathLike | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Write the metrics CSV, the plots folder and the HTML report (each atomically); returns the paths.

    Plots: ``training_curves.png`` and per-layer SW1 bars before (epoch 0) and after (last epoch).
    """
    from perdiag import plots as plotting
    from perdiag.html import write_html

    written: list[Path] = []
    frame = result.metrics
    if metrics:
        written.append(write_metrics(frame, metrics))
    history = result.state.history
    bars = {"sw1_before": layer_sw1_table(history[0]), "sw1_after": layer_sw1_table(history[-1])} if history else {}
    if plots:
        folder = Path(plots)
        written.append(plotting.plot_training_curves(frame, folder / "training_curves.png"))
        for name, table in bars.items():
            if len(table):
                written.append(plotting.plot_sw1_bars(table, folder / f"{name}.png"))
    if html:
        images = {}
        with tempfile.TemporaryDirectory() as scratch:
            images["training curves"] = plotting.plot_training_curves(frame, Path(scratch) / "curves.png").read_bytes()
            for name, table in bars.items():
                if len(table):
                    label = name.replace("_", " ") + (" (epoch 0)" if name.endswith("before") else " (last epoch)")
                    images[label] = plotting.plot_sw1_bars(table, Path(scratch) / f"{name}.png").read_bytes()
        write_html(
            html,
            title=f"perdiag train: {Path(settings.get('model', 'model')).name}",
            settings=dict(settings),
            table=frame.loc[:, list(METRIC_COLUMNS)],
            overview_images=images,
            layer_images={},
            notes=list(notes or []),
        )
        written.append(Path(html))
    return written


# -- console helpers for the CLI (formatting only) ------------------------------------------------


def steps_per_epoch(n_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: each rank sees ceil(n / world) examples in batches of batch / world."""
    per_rank_examples = -(-n_examples // world_size)
    return -(-per_rank_examples // (batch_size // world_size))


def steps_remaining(plan: TrainPlan, world_size: int = 1) -> int:
    """Steps this run still has to take (for the progress bar)."""
    config = plan.config
    per_epoch = steps_per_epoch(len(plan.train), config.batch_size, world_size)
    state = TrainState.from_dict(plan.resume_from["train_state"]) if plan.resuming else TrainState()
    return max((config.epochs - state.epoch) * per_epoch - state.step_in_epoch, 0)


def _number(value: Any, digits: int = 4) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(number) else f"{number:.{digits}g}"


def epoch_line(row: Mapping[str, Any], config: TrainConfig) -> str:
    """One plain line per epoch, e.g. ``epoch 2/5: task 0.101 per 2.91 | val loss 0.177 acc 0.947 SW1 1.09``."""
    parts = [f"epoch {row['epoch']}/{config.epochs}:"]
    if row["epoch"] == 0:
        parts.append("before training |")
    else:
        parts.append(f"task {_number(row.get('train_task_loss'))}")
        if config.regularised:
            parts.append(f"{config.reg} {_number(row.get('train_reg'))}")
        parts.append(f"({_number(row.get('step_time_s') * 1e3 if row.get('step_time_s') else math.nan, 3)} ms/step) |")
    parts.append(f"val loss {_number(row.get('val_loss'))}")
    if config.task == "classification":
        parts.append(f"acc {_number(row.get('val_accuracy'))}")
    parts.append(f"SW1 {_number(row.get('val_sw1'))} PER {_number(row.get('val_per'))}")
    return " ".join(parts)


def metrics_table(frame: pd.DataFrame, title: str):
    """The per-epoch metrics as a rich Table (main columns only; per-layer values are in --metrics)."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    columns = [c for c in METRIC_COLUMNS if c in frame.columns and frame[c].notna().any()]
    for column in columns:
        table.add_column(column, justify="right")
    for record in frame.loc[:, columns].to_dict(orient="records"):
        table.add_row(*(str(int(record[c])) if c in ("epoch", "steps") else _number(record[c]) for c in columns))
    return table


def summary_lines(result: TrainResult, plan: TrainPlan) -> list[str]:
    """Closing lines: SW1 before -> after, and how to read it."""
    history = result.state.history
    first, last = history[0], history[-1]
    names = [name for name, _ in plan.layers]
    return [
        f"val SW1 to N(0,1), mean over {len(names)} regularised layer(s) ({', '.join(names[:6])}"
        f"{', ...' if len(names) > 6 else ''}): {_number(first.get('val_sw1'))} before -> {_number(last.get('val_sw1'))} "
        f"after epoch {last['epoch']} (exact, up to {SW1_MAX_SAMPLES} rows per layer, {SW1_PROJECTIONS} directions, seed "
        f"{plan.config.seed}; 0 would be N(0,1))",
    ]

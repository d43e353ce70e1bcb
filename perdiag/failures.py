"""Turning a model's shape errors into one line that names the layer and what it expected."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from perdiag.errors import PerdiagError

#: Attributes that say what input a module expects, in the order they are reported.
_EXPECTATIONS = (
    ("in_features", "{} features in the last dimension"),
    ("in_channels", "{} channels in dimension 1"),
    ("input_size", "{} features in the last dimension"),
    ("normalized_shape", "trailing dimensions {}"),
    ("num_features", "{} features/channels in dimension 1"),
    ("num_embeddings", "integer ids in [0, {})"),
    ("embed_dim", "{} features in the last dimension"),
)


def expected_input(module: nn.Module) -> str | None:
    """A short description of the input ``module`` expects, from its constructor attributes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        # Name the rank too: a (B, C, W) batch for Conv2d fails as "unbatched", not on its channels.
        spatial = ", ".join("HW"[: len(module.kernel_size)] if len(module.kernel_size) <= 2 else ["D", "H", "W"])
        return f"a {2 + len(module.kernel_size)}-D (batch, {module.in_channels}, {spatial}) input"
    for attribute, template in _EXPECTATIONS:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, tuple)) and not isinstance(value, bool):
            return template.format(value)
    d_model = getattr(getattr(module, "self_attn", None), "embed_dim", None)
    if isinstance(d_model, int):
        return f"{d_model} features in the last dimension"
    return None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


@contextlib.contextmanager
def name_failing_layer(model: nn.Module) -> Iterator[None]:
    """Within the block, a RuntimeError/IndexError raised inside a submodule's forward becomes a
    :class:`PerdiagError` naming the innermost module that was running, its input and what it expects.

    Only errors about shapes, sizes, dtypes or indices are translated: they are input mistakes the
    user can fix. Anything else propagates unchanged. Hooks are removed on every exit path.
    """
    running: list[tuple[str, nn.Module, tuple]] = []
    failed: list[tuple[str, nn.Module, tuple]] = []
    handles = []

    def enter(name):
        def hook(module, args):
            running.append((name, module, args))

        return hook

    def leave(module, args, output):
        if running:
            running.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "<model>")))
        handles.append(module.register_forward_hook(leave))
    try:
        try:
            yield
        except (RuntimeError, IndexError) as err:
            failed = running[-1:] or failed
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if failed and _is_input_error(message):
                name, module, args = failed[0]
                inputs = ", ".join(_describe(a) for a in args) or "no positional input"
                expected = None if "dtype" in message.lower() else expected_input(module)
                raise PerdiagError(
                    f"layer {name} ({type(module).__name__}) rejected its input {inputs}"
                    + (f"; it expects {expected}" if expected else "")
                    + f" ({message}); {_fix_hint(module, args)}"
                ) from err
            raise
    finally:
        for handle in handles:
            handle.remove()


def _fix_hint(module: nn.Module, args: tuple) -> str:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    integer_input = any(not (a.is_floating_point() or a.is_complex()) for a in tensors)
    float_weights = any(p.is_floating_point() for p in module.parameters(recurse=False))
    if integer_input and float_weights:
        return "save the inputs as float32: integer data is kept as is, for token ids"
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int) and tensors and tensors[0].ndim >= 1 and tensors[0].shape[-1] == in_features + 1:
        # The classic CSV mistake: the label column read as one more feature.
        return "one input column too many: if it holds the targets, name it with --target-column"
    return "check the data against the model (--data, or --input-shape with --random)"


def _is_input_error(message: str) -> bool:
    lowered = message.lower()
    words = ("shape", "size", "dimension", "dtype", "index out of range", "expected", "must match", "mat1")
    return any(word in lowered for word in words)


def call_naming_failures(model: nn.Module, call: Callable[[], object]):
    """``call()``, and if it fails with a shape-like error, run it once more with
    :func:`name_failing_layer` to find and name the layer.

    The happy path carries no tracing hooks at all (they cost a Python call per module and
    batch); only a failing batch pays for the second, traced run.
    """
    try:
        return call()
    except (RuntimeError, IndexError) as first_error:
        try:
            with name_failing_layer(model):
                call()
        except PerdiagError:
            raise
        except (RuntimeError, IndexError):
            pass
        raise first_error

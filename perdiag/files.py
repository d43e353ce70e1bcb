"""Writing output files so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from perdiag.errors import PerdiagError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file lives in the destination folder so that ``os.replace`` is atomic (same
    file system). If the body raises, the temporary file is removed and ``path`` is untouched,
    so an existing output is never clobbered by a failed run. ``suffix`` defaults to the
    destination's own extension last, for writers that pick a format by it (matplotlib, pandas).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PerdiagError(f"cannot create the output folder {folder}: {err.strerror}") from err
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp" + path.suffix, dir=folder
        )
    except OSError as err:
        raise PerdiagError(f"cannot write {path}: {err.strerror}; choose a writable output path") from err
    os.close(handle)
    temporary = Path(temporary)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


#: The first bytes of the formats perdiag reads, to tell a damaged or foreign file from a pickle.
ZIP_MAGIC = b"PK\x03\x04"  # torch.save (since 1.6) and .npz
NPY_MAGIC = b"\x93NUMPY"


def looks_like_torch_save(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file: a zip archive, or a legacy pickle.

    ``torch.load(weights_only=True)`` refuses random bytes with the same "Weights only load failed"
    it gives a real pickle of Python objects; only a file that starts like one can be the latter.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head == ZIP_MAGIC or head[:1] == b"\x80"  # pickle protocol 2+ opcode


def starts_with(path: str | os.PathLike, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic

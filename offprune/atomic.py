"""The one way offprune writes a file: to a temporary file beside it, flushed and fsynced, then
renamed over the target. A crash leaves the old file or the new one, never half of one; any
failure (a full disk, a read-only file system, a file where a folder should be) removes the
temporary file and raises one line: `cannot write PATH: REASON`.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from offprune.errors import UserError


class WriteError(UserError):
    """A file could not be written; the message names it and the reason."""


def _reason(e: BaseException, path: Path) -> str:
    if isinstance(e, FileExistsError) or isinstance(e, NotADirectoryError):
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a folder"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    text = str(e)
    found = re.search(r"errno = (\d+)", text)  # libraries that wrap the OS error in their own message
    if found:
        return os.strerror(int(found.group(1)))
    return text.splitlines()[0] if text else type(e).__name__


def write_with(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """Call `write(tmp)` to fill a temporary file, then move it to `path` (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError / ValueError: writers that wrap OSError
        raise WriteError(f"cannot write {path}: {_reason(e, path)}") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the folder itself is gone or unwritable: nothing was left there
    return path


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), fsync)


def write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync)


def write_json(path: str | Path, data: Any, fsync: bool = True) -> Path:
    return write_text(path, json.dumps(data, indent=1) + "\n", fsync)


def torch_save(obj: object, path: str | Path) -> Path:
    """torch.save through memory first: a full disk then raises OSError(ENOSPC) with its reason,
    not torch's `enforce fail at inline_container.cc`."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())

"""Atomic file writes and safe (pickle-free) reading of adapter files."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class AdapterError(ValueError):
    pass


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then move tmp_path over path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 (and a writer may recreate it): the mode open() gives
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_json(path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")
    atomic_write(path, write)


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise AdapterError(not_utf8(path, e)) from None
    except IsADirectoryError:
        raise AdapterError(f"{path}: is a folder, expected a JSON file") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def not_utf8(path, error: UnicodeDecodeError) -> str:
    """How every reader names a file that is not UTF-8 text: its line and byte."""
    line = error.object.count(b"\n", 0, error.start) + 1
    return f"{path}: line {line}: not UTF-8 text (byte 0x{error.object[error.start]:02x}); save the file as UTF-8"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return sha256(path)


def load_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None

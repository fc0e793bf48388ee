"""Atomic writes, parquet helpers and metrics files.

Every artifact is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written file that DVC could cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError


class ArtifactError(RuntimeError):
    """An input artifact is missing or unreadable; the message names it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Works for files and folders. On an exception the temporary is removed and
    whatever was at ``path`` before is left untouched; an I/O error (full disk,
    no permission) becomes an :class:`ArtifactError` that names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write here ({_oneline(exc)})") from exc
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            target.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    except (OSError, SafetensorError) as exc:  # a full disk, a quota, a read-only mount: name the artifact
        raise ArtifactError(f"{path}: write failed, nothing was replaced ({_oneline(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` left by a writer that was killed (SIGKILL runs no cleanup):
    ``.<name>.<pid>.<random>.tmp`` whose process no longer runs on this machine."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def write_parquet(rows: list[dict[str, Any]], path: str | os.PathLike, schema: pa.Schema) -> None:
    """Write ``rows`` (dicts with exactly the schema's columns) atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> list[dict[str, Any]]:
    """Read a parquet file as a list of row dicts, checking the columns against ``schema``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing (run the stage that writes it first)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable parquet file ({exc})") from None
    if schema is not None:
        missing = [name for name in schema.names if name not in table.column_names]
        if missing:
            raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
        table = _cast(table.select(schema.names), schema, path)
    return table.to_pylist()


def _cast(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    """``table`` with the schema's column types; a column that cannot be cast is named."""
    for field in schema:
        actual = table.schema.field(field.name).type
        if actual == field.type:
            continue
        try:
            column = table.column(field.name).cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise ArtifactError(f"{path}: column '{field.name}' is {actual}, expected {field.type}") from None
        table = table.set_column(table.schema.get_field_index(field.name), field.name, column)
    return table


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically (metrics, reports)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing")
    return json.loads(path.read_text())

"""The one atomic file write every package uses: temp file, fsync, rename, fsync directory.

A reader sees the old content or the new, never a torn file; after ``atomic_write``
returns, the new content survives a power cut (the rename is made durable by syncing the
directory). ``OSError`` propagates: callers turn it into their own typed error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (creates parent directories)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(final.parent)


def sync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and unlinks in ``path`` durable."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_writable_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` if needed and prove a file can be written in it (``OSError`` if not)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".write-test.{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()

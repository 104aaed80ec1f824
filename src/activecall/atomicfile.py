"""Files written whole: a crash leaves either the new file or the old one, never a part.

``write_atomically`` writes one file through a temp file in the same directory, fsync and rename
(then fsyncs the directory); ``write_batch`` does the same for many files at once (CDRs).

This module imports nothing of the daemon's: media, call and web code may use it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (then fsync the directory)."""
    error = write_batch([(path, data)])[0]
    if error is not None:
        raise error


BATCH_FILES = 64  # temp files held open by one write_batch slice


def write_batch(items: Sequence[tuple[str, bytes]]) -> list[Optional[BaseException]]:
    """``write_atomically`` for several files at once: every file is written to a temp file, then
    every temp file is fsynced, then each is renamed, then each directory is fsynced once.  Writing
    them all before the first fsync lets the file system commit the whole batch in one journal
    transaction (on ext4 the later fsyncs find their inodes already committed), where write-fsync
    per file cost one commit each.  At most ``BATCH_FILES`` files are open at once (a backlog after
    a stall is written in slices).  Returns one entry per item: None, or the exception that stopped
    that item (the others are still written)."""
    if len(items) > BATCH_FILES:
        return [result for start in range(0, len(items), BATCH_FILES)
                for result in write_batch(items[start:start + BATCH_FILES])]
    results: list[Optional[BaseException]] = [None] * len(items)
    written: list[tuple[int, int, str, str]] = []
    for i, (path, data) in enumerate(items):
        directory = os.path.dirname(path) or "."
        fd = tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            written.append((i, fd, tmp, path))
        except Exception as e:
            results[i] = e
            _discard(fd, tmp)
    renamed: list[tuple[int, str, str]] = []
    for i, fd, tmp, path in written:
        try:
            os.fsync(fd)
            os.close(fd)
            renamed.append((i, tmp, path))
        except Exception as e:
            results[i] = e
            _discard(fd, tmp)
    directories = set()
    for i, tmp, path in renamed:
        try:
            os.replace(tmp, path)
            directories.add(os.path.dirname(path) or ".")
        except Exception as e:
            results[i] = e
            _discard(None, tmp)
    for directory in directories:
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    return results


def _discard(fd: Optional[int], tmp: Optional[str]) -> None:
    """Close and remove a temp file that will not be renamed (errors ignored: it is already lost)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass

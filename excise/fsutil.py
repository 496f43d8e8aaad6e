"""Replace an output folder so that a kill at any instant leaves a complete output (STYLE.md rule 5).

Every writer fills a temporary folder beside its target (``.NAME.tmp-…``, possibly incomplete)
and hands it to :func:`replace_dir`, which swaps it in with renames inside one folder (each
atomic on POSIX):

1. the finished folder is renamed ``.NAME.new-ID``: from here on it is known to be complete;
2. an existing ``NAME`` is renamed ``.NAME.old-ID`` (moved aside, not deleted);
3. ``.NAME.new-ID`` is renamed ``NAME``;
4. ``.NAME.old-ID`` is deleted.

So at every instant ``NAME``, ``.NAME.new-ID`` or ``.NAME.old-ID`` holds a complete output.
:func:`recover_dir` finishes a swap a kill interrupted: a ``.new-`` folder is moved into
place (it is complete and newer), else a moved-aside ``.old-`` folder is put back, and
superseded ``.old-`` copies are deleted. The earlier way (delete ``NAME``, then rename the
temporary folder) lost both when killed in between, and leftover cleanup of ``.NAME.*tmp*``
then deleted the finished temporary folder. ``new``/``old`` names never contain ``tmp``, so
such cleanup never deletes a complete output.

Imported by every layer (``pem/``, ``models/``, ``train/``, ``evaluate/``, ``pipeline/``):
standard library only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from pathlib import Path

__all__ = ["recover_dir", "replace_dir"]


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``src`` to ``dst``, replacing any ``dst``, safe against a kill.

    An existing ``dst`` is moved aside first and deleted only once ``src`` is in its place
    (module docstring: the steps; :func:`recover_dir` finishes them after a kill).

    Args:
        src: a complete folder, in the same folder as ``dst`` (renames do not cross file systems).
        dst: the target path.

    Returns:
        ``dst``.

    Raises:
        OSError: a rename failed; ``dst`` then holds what it held before.
    """
    src, dst = Path(src), Path(dst)
    tag = uuid.uuid4().hex[:8]
    new, old = dst.with_name(f".{dst.name}.new-{tag}"), dst.with_name(f".{dst.name}.old-{tag}")
    os.rename(src, new)  # complete from here on: recover_dir may move it into place
    if os.path.lexists(dst):
        os.rename(dst, old)
    try:
        os.rename(new, dst)
    except OSError:
        if os.path.lexists(old) and not os.path.lexists(dst):
            os.rename(old, dst)  # put the old output back
        raise
    _remove(old)
    return dst


def recover_dir(dst: str | Path) -> None:
    """Finish a :func:`replace_dir` that a kill interrupted at ``dst``; a no-op when none was.

    A ``.NAME.new-ID`` sibling (complete, never moved into place) replaces ``dst``; with none,
    a missing ``dst`` gets its moved-aside ``.NAME.old-ID`` back. Remaining ``.old-`` copies
    (superseded) are deleted. Call it where no other process writes ``dst`` (a run holds its
    lock; a command is about to write ``dst`` itself).
    """
    dst = Path(dst)
    new, old = _pending(dst, "new"), _pending(dst, "old")
    if new:
        *stale, newest = new
        for path in stale:
            _remove(path)
        replace_dir(newest, dst)
    elif old and not os.path.lexists(dst):
        os.rename(old.pop(), dst)
    for path in old:
        _remove(path)


def _pending(dst: Path, kind: str) -> list[Path]:
    """``.NAME.<kind>-ID`` siblings of ``dst``, oldest first."""
    if not dst.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.{kind}-[0-9a-f]{{8}}")
    found = [Path(p) for p in glob.glob(glob.escape(str(dst.parent)) + os.sep + f".*.{kind}-*")]
    return sorted((p for p in found if pattern.fullmatch(p.name)), key=lambda p: p.lstat().st_mtime)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()

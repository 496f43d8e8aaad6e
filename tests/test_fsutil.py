"""Replacing an output folder: a kill at any step leaves the old or the new output complete, and
the run's leftover cleanup never deletes a complete output."""

from __future__ import annotations

import os
import shutil

import pytest

from excise import fsutil
from excise.pem.io import atomic_output_dir
from excise.pipeline.run import _remove_leftovers

OLD = {"weights": "old weights", "config.json": "old config"}
NEW = {"weights": "new weights", "README.md": "new readme"}


class _Killed(BaseException):
    """What SIGKILL does to the writer: nothing after this point runs, no cleanup either."""


def _write(folder, files):
    for name, text in files.items():
        (folder / name).write_text(text)


def _read(folder):
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else None


def _kill_at(monkeypatch, k):
    """Kill the writer at its ``k``-th rename or delete (0-based); returns a switch to stop killing."""
    calls, armed = [0], [True]

    def wrap(real):
        def step(*args, **kwargs):
            if armed[0]:
                calls[0] += 1
                if calls[0] == k + 1:
                    raise _Killed
            return real(*args, **kwargs)

        return step

    for module, name in [(os, "rename"), (os, "replace"), (shutil, "rmtree")]:
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    return lambda: armed.__setitem__(0, False)


@pytest.mark.parametrize("k", range(5))
def test_a_kill_at_any_step_leaves_the_old_or_the_new_output_and_cleanup_keeps_it(tmp_path, monkeypatch, k):
    out = tmp_path / "adapters" / "ext_sub"
    out.mkdir(parents=True)
    _write(out, OLD)
    disarm = _kill_at(monkeypatch, k)
    try:
        with atomic_output_dir(out, overwrite=True) as tmp:
            _write(tmp, NEW)
        killed = False
    except _Killed:
        killed = True
    disarm()
    # The next run clears the leftovers of the killed attempt before the stage starts again.
    _remove_leftovers(out)
    assert _read(out) in (OLD, NEW)
    # Once the new output was complete (the first rename marks it so), it is the one kept.
    assert _read(out) == (OLD if killed and k == 0 else NEW)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ext_sub"]  # no leftovers either
    assert k < 4 or not killed  # four steps: mark complete, move aside, move in, delete the old


@pytest.mark.parametrize("k", range(4))
def test_the_next_write_finishes_a_replacement_a_kill_cut_short(tmp_path, monkeypatch, k):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, OLD)
    new = tmp_path / ".out.tmp-1"
    new.mkdir()
    _write(new, NEW)
    disarm = _kill_at(monkeypatch, k)
    with pytest.raises(_Killed):
        fsutil.replace_dir(new, out)
    disarm()
    fsutil.recover_dir(out)
    assert _read(out) == (OLD if k == 0 else NEW)
    if k == 0:  # killed before the swap began: the unfinished temp folder is the caller's to remove
        assert _read(new) == NEW
        shutil.rmtree(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(Exception, match="not empty"):  # recovered, so an existing output again
        atomic_output_dir(out)


def test_replace_dir_into_a_new_place_and_the_helpers_are_shared(tmp_path):
    from excise.models import merge
    from excise.pem import io

    src = tmp_path / ".x.tmp-1"
    src.mkdir()
    _write(src, NEW)
    assert fsutil.replace_dir(src, tmp_path / "x") == tmp_path / "x"
    assert _read(tmp_path / "x") == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    fsutil.recover_dir(tmp_path / "missing" / "y")  # nothing to do, not even a parent folder
    # One helper: the adapter writers (pem/io.py) and the model merge (models/merge.py) use it.
    assert io.replace_dir is merge.replace_dir is fsutil.replace_dir
    # Other outputs' pending folders are not ours: `.x.y.new-…` belongs to `x.y`, not `x`.
    other = tmp_path / ".x.y.new-0123abcd"
    other.mkdir()
    fsutil.recover_dir(tmp_path / "x")
    assert other.is_dir() and _read(tmp_path / "x") == NEW

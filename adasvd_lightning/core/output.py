"""Output folders that never destroy what the user owns and never appear half-written.

Rules, checked before any work starts (`check_destination`):

* An empty ``--out`` is an error (an unset shell variable must not mean "the current folder").
* The destination may not be an input (the model folder, a checkpoint), a folder that contains one,
  the working directory or a folder containing it, the home folder or a filesystem root.
* An existing destination is replaced only with ``overwrite`` *and* only when this project wrote it:
  every output carries a marker file (`MARKER`) listing the files it wrote, and a folder without the
  marker, or holding files the marker does not list (the user's own notes, say), is refused.

Writing (`atomic_directory`) goes to a uniquely named hidden sibling (``.<name>.adasvd-tmp-<uuid>``),
locked with ``flock`` while the run lives. On success it takes the destination's place in one step:
``renameat2(RENAME_NOREPLACE)`` for a new folder, ``renameat2(RENAME_EXCHANGE)`` to swap with the
previous output (Linux); elsewhere two renames through an ``.adasvd-old-<uuid>`` sibling. So at every
instant the destination is either the complete previous output or the complete new one. A run that
is killed leaves its temporary sibling behind; the next run writing the same destination removes such
leftovers (recognised by name *and* marker, and only when no live process holds their lock) and says
so, and puts an ``.adasvd-old-`` copy back if a fallback swap was cut between its two renames.

Folders are created with the user's umask (not the 0700 of `tempfile.mkdtemp`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidInputError

__all__ = [
    "MARKER",
    "OutputWarning",
    "atomic_directory",
    "check_destination",
    "check_free_space",
    "clean_stale_temporaries",
]

#: File written into every output folder; lists the files the project wrote there.
MARKER = "adasvd-output.json"
_WRITER = "adasvd-lightning"
_TMP_TAG = ".adasvd-tmp-"
_OLD_TAG = ".adasvd-old-"


class OutputWarning(UserWarning):
    """Something about an output folder the user should know (e.g. stale temporaries removed)."""


def resolve_destination(value: str | os.PathLike | None) -> Path:
    """The absolute destination path; an empty value is an error, not the current folder."""
    if value is None or not str(value).strip():
        raise InvalidInputError("the output folder is empty (an unset variable?); give a folder name with --out")
    path = Path(value).expanduser()
    if path.is_symlink():
        raise InvalidInputError(f"output folder {path} is a symbolic link; give the real folder")
    return path.resolve()


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def check_destination(destination: str | os.PathLike | None, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output folder before any work (see the module docstring); return its absolute path."""
    dest = resolve_destination(destination)
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if _contains(dest, source):
            what = "is" if dest == source else "contains"
            raise InvalidInputError(f"output folder {dest} {what} the input {source}; choose another --out")
    cwd = Path.cwd().resolve()
    if _contains(dest, cwd):
        raise InvalidInputError(f"output folder {dest} is (or contains) the working directory; choose another --out")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    if dest in (home, Path(dest.anchor)):
        raise InvalidInputError(f"output folder {dest} is the home folder or a filesystem root; choose another --out")
    if dest.exists():
        if not overwrite:
            raise InvalidInputError(f"output folder {dest} already exists (use --overwrite to replace it)")
        problem = _not_ours(dest)
        if problem:
            raise InvalidInputError(f"refusing to replace {dest}: {problem}; delete it yourself or choose another --out")
    return dest


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == _WRITER else None


def _files(folder: Path) -> list[str]:
    """Relative paths of every non-directory entry below ``folder`` (symlinks count as files)."""
    found = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in names]
        found += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(f for f in found if f != MARKER)


def _not_ours(folder: Path) -> str | None:
    """Why ``folder`` is not a complete output this project wrote, or None when it is."""
    if not folder.is_dir() or folder.is_symlink():
        return "it is not a folder"
    marker = _read_marker(folder)
    if marker is None or not marker.get("complete") or not isinstance(marker.get("files"), list):
        return f"it was not written by adasvd (no {MARKER})"
    extra = sorted(set(_files(folder)) - set(marker["files"]))
    if extra:
        return f"it holds files adasvd did not write ({', '.join(extra[:3])}{', …' if len(extra) > 3 else ''})"
    return None


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to query it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would (some writers,
    e.g. safetensors, create their files 0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, names in os.walk(folder):
        for entry in (Path(root) / n for n in (*dirs, *names)):
            if not entry.is_symlink():
                os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _write_marker(folder: Path, *, complete: bool) -> None:
    data = {"writer": _WRITER, "complete": complete, "files": _files(folder) if complete else []}
    (folder / MARKER).write_text(json.dumps(data, indent=1) + "\n")


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, free_bytes: int | None = None) -> None:
    """Refuse when ``folder``'s filesystem has less than ``needed_bytes`` free (``free_bytes`` overrides)."""
    free = shutil.disk_usage(folder).free if free_bytes is None else free_bytes
    if needed_bytes > free:
        raise InvalidInputError(
            f"not enough disk space for the output in {folder}: it needs about {_size(needed_bytes)}, "
            f"{_size(free)} free"
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


# --- Linux renameat2: one-step swap / no-replace rename ----------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False when this platform or filesystem does not offer it (caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


# --- locking and stale temporaries -------------------------------------------------------------------

def _lock(folder: Path) -> int | None:
    """An exclusive flock on ``folder`` held through the returned descriptor (None without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def clean_stale_temporaries(dest: Path) -> list[Path]:
    """Remove temporaries an interrupted run left beside ``dest``; return what was removed or restored.

    Only siblings named ``.<dest name>.adasvd-tmp-*`` / ``.adasvd-old-*`` that carry this project's
    marker (or are empty) and whose lock no live process holds are touched. An ``-old-`` copy is moved
    back to ``dest`` when ``dest`` is missing (a fallback swap cut between its renames).
    """
    if not dest.parent.is_dir():
        return []
    touched = []
    prefix = f".{dest.name}"
    for entry in sorted(dest.parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        tag = entry.name[len(prefix):len(prefix) + len(_TMP_TAG)]
        if tag not in (_TMP_TAG, _OLD_TAG):
            continue
        if _read_marker(entry) is None and any(entry.iterdir()):
            continue  # not ours
        try:
            fd = _lock(entry)
        except OSError:
            continue  # a live run is writing it
        if fd is None:
            continue  # no locking here: cannot tell a live run from a dead one, leave it
        try:
            if tag == _OLD_TAG and not dest.exists() and _not_ours(entry) is None:
                os.rename(entry, dest)
                warnings.warn(f"restored {dest} from {entry.name}, left by an interrupted run", OutputWarning,
                              stacklevel=3)
            else:
                shutil.rmtree(entry)
                warnings.warn(f"removed {entry}, a temporary folder left by an interrupted run", OutputWarning,
                              stacklevel=3)
            touched.append(entry)
        finally:
            _unlock(fd)
    return touched


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=what == "parent", exist_ok=what == "parent")
    except OSError as exc:
        raise InvalidInputError(f"cannot write the output next to {path}: {exc.strerror or exc}") from None


@contextmanager
def atomic_directory(destination: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``destination`` in one step.

    Validates the destination first (`check_destination`), cleans stale temporaries, and creates the
    temporary folder — so an unwritable location fails before the caller's work. On an exception the
    temporary folder is removed and ``destination`` is untouched.
    """
    dest = check_destination(destination, overwrite=overwrite, inputs=inputs)
    _mkdir(dest.parent, "parent")
    clean_stale_temporaries(dest)
    tmp = dest.parent / f".{dest.name}{_TMP_TAG}{uuid.uuid4().hex}"
    _mkdir(tmp, "temporary")
    fd = None
    try:
        fd = _lock(tmp)
        _write_marker(tmp, complete=False)
        yield tmp
        _write_marker(tmp, complete=True)
        _apply_umask(tmp)
        _commit(tmp, dest, overwrite=overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the space estimate was beaten (another writer)
            raise InvalidInputError(f"disk full while writing {dest}; nothing was changed there") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(fd)


def _appeared(dest: Path) -> InvalidInputError:
    return InvalidInputError(f"output folder {dest} appeared while this run was writing it; left as it is")


def _commit(tmp: Path, dest: Path, *, overwrite: bool) -> None:
    """Put the finished ``tmp`` at ``dest``: a single rename, or a swap with the previous output."""
    if not dest.exists():
        try:
            if not _renameat2(tmp, dest, _RENAME_NOREPLACE):
                os.rename(tmp, dest)  # fallback: fails on a non-empty folder that appeared meanwhile
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise _appeared(dest) from None
        return
    if not overwrite:
        raise _appeared(dest)
    problem = _not_ours(dest)
    if problem:  # checked again: the folder may have changed during the run
        raise InvalidInputError(f"refusing to replace {dest}: {problem}")
    if _renameat2(tmp, dest, _RENAME_EXCHANGE):
        shutil.rmtree(tmp)  # now holds the previous output
        return
    old = dest.parent / f".{dest.name}{_OLD_TAG}{uuid.uuid4().hex}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old)

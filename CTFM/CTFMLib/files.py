"""The files CT-FM writes and deletes: one rule for each way a user's data could be harmed.

- :func:`child_path`: a name that becomes a path (a model id, an output name from a CSV, a run
  folder) names an entry strictly inside a given folder, on every platform, or is refused.
- :func:`remove_tree`: every recursive delete names the store it cleans and refuses anything
  outside it (the store itself included).
- :func:`atomic_output` / :func:`atomic_write_bytes` / :func:`atomic_write_text`: every output,
  checkpoint, index file and import is written in a private temporary folder (random
  128-bit name, mode 0700, created exclusively) beside its destination, checked, fsync'ed and
  renamed into place; a failed write (disk full) raises :class:`WriteError` and leaves neither a
  final nor a temporary file. The rename never follows a symlink planted at the final name, and
  without ``overwrite`` it never replaces an existing file.
- :func:`check_outputs`: an output may not be one of the command's inputs (same path, same file
  through a link, or a hard link to it), an existing folder, or an existing file unless the
  user said ``--overwrite``.

Temporary folders are removed when the writer fails, is cancelled, or is interrupted by SIGINT or
SIGTERM (see :func:`CTFMLib.progress.terminate_on_sigterm`); only SIGKILL can leave one behind, named
``.ctfm-tmp-HOST-PID-*`` and never under a final name, and the next write into that folder removes it
once that process is gone (:func:`sweep_stale_temporaries`). This module imports no torch and no SimpleITK.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

__all__ = [
    "read_json_object",
    "FileSafetyError", "OutputExistsError", "WriteError", "TEMP_PREFIX",
    "safe_name", "child_path", "is_inside", "remove_tree", "same_file",
    "atomic_output", "atomic_outputs", "atomic_write_bytes", "private_folder", "temporary_folder", "sweep_stale_temporaries", "atomic_write_text", "check_outputs", "fsync_dir", "describe_os_error", "host_tag",
]  # fmt: skip

TEMP_PREFIX = ".ctfm-tmp-"
# Characters Windows forbids in names (and ':' opens an NTFS stream); control characters are never a name.
_FORBIDDEN = set('<>:"/\\|?*')
_DRIVE = re.compile(r"^[A-Za-z]:")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_MAX_NAME_BYTES = 255


class FileSafetyError(ValueError):
    """A path, name or output was refused because using it could harm a user's files."""


class OutputExistsError(FileSafetyError):
    """The output exists already and the user did not ask to overwrite it."""


class WriteError(OSError):
    """Writing an output failed (disk full, no permission, ...); nothing was left behind.

    Built as ``WriteError(errno, one_line_message)``; ``str()`` is the message alone.
    """

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


# --- names that become paths -----------------------------------------------------------------


def safe_name(name, what: str = "name") -> str:
    """``name`` when it is one plain file or folder name on every platform; else :class:`FileSafetyError`.

    Refused: empty, ``.``, ``..``, separators (``/`` and ``\\``), drive letters, characters Windows
    forbids, control characters (NUL included), trailing dots or spaces (Windows drops them),
    reserved device names (``CON``, ``NUL``, ...), and names over 255 bytes.
    """
    if not isinstance(name, str):
        raise FileSafetyError(f"{what} must be text, not {type(name).__name__}")
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    if not name.strip():
        raise FileSafetyError(f"{what} is empty")
    if name in (".", ".."):
        raise FileSafetyError(f"{what} {shown} names a folder, not an entry in it")
    if _DRIVE.match(name):
        raise FileSafetyError(f"{what} {shown} starts with a drive letter: give a plain name")
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        listed = " ".join(repr(c) for c in bad)
        raise FileSafetyError(f"{what} {shown} contains {listed}: use letters, digits, '-', '_', '.' and spaces")
    if name != name.rstrip(" ."):
        raise FileSafetyError(f"{what} {shown} ends with a dot or a space, which Windows drops")
    if name.split(".")[0].strip().upper() in _RESERVED:
        raise FileSafetyError(f"{what} {shown} is a reserved device name on Windows")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise FileSafetyError(f"{what} {shown} is longer than {_MAX_NAME_BYTES} bytes")
    return name


def is_inside(path, root) -> bool:
    """Whether ``path`` resolves strictly inside ``root`` (not ``root`` itself), following links."""
    root = Path(root).resolve()
    resolved = Path(path).resolve()
    return resolved != root and root in resolved.parents


def child_path(root, name, what: str = "name") -> Path:
    """``root / name`` for a :func:`safe_name`, refused unless it resolves to an entry directly in ``root``.

    An existing symlink at ``root / name`` that points elsewhere is refused too.
    """
    safe_name(name, what)
    path = Path(root) / name
    if path.resolve().parent != Path(root).resolve():
        raise FileSafetyError(f"{what} {name!r} leads outside {root}")
    return path


def remove_tree(path, root, what: str = "folder") -> None:
    """Delete the folder ``path``, which must lie strictly inside ``root`` (the store that owns it).

    A symlink is removed as a link (its target is never touched); a missing ``path`` is no error.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        home = Path(os.path.abspath(path)).parent  # where the link itself lives
        if home.resolve() != Path(root).resolve() and not is_inside(home, root):
            raise FileSafetyError(f"refused to delete {path}: it is not inside {root}")
        path.unlink()
        return
    if not is_inside(path, root):
        raise FileSafetyError(f"refused to delete the {what} {path}: it is not inside {root}")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# --- atomic writes ------------------------------------------------------------------------------

_live_lock = threading.Lock()
_live: set = set()  # private temporary folders in use (for tests and diagnostics)


def live_temporaries() -> list:
    """Private temporary folders currently open in this process."""
    with _live_lock:
        return sorted(_live)


def fsync_dir(path) -> None:
    """Make a creation or rename in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_umask_lock = threading.Lock()


def _default_mode() -> int:
    """What ``open()`` would give a new file under the current umask (mkdtemp/mkstemp give 0600)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _errno_of(e: BaseException):
    """The errno behind ``e``, also when a library re-raised it as text (pydicom) or as its cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None):
            return e.errno
        found = re.search(r"\[Errno (\d+)\]", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError, path) -> str:
    """One line for a failed write: disk full, read-only, no permission, or the system's words."""
    code = _errno_of(e)
    where = Path(path)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"no space left on the disk that holds {where.parent}: free some space and run again"
    if code == errno.EROFS:
        return f"{where.parent} is on a read-only disk: choose another output folder"
    if code in (errno.EACCES, errno.EPERM):
        return f"not allowed to write in {where.parent}: check its permissions or choose another folder"
    text = str(e.strerror or e).strip().splitlines()
    return f"{text[0] if text else type(e).__name__} ({where})"


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)  # replaces a link planted at ``final`` itself, never its target
        return
    try:
        os.link(tmp, final)  # atomic and never replaces: fails when ``final`` appeared meanwhile
    except FileExistsError:
        raise OutputExistsError(f"{final} exists already: choose another name, or add --overwrite") from None
    except OSError:  # no hard links here (FAT, some network shares): check, then rename
        if os.path.lexists(final):
            raise OutputExistsError(f"{final} exists already: choose another name, or add --overwrite") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


@contextmanager
def atomic_output(path, overwrite: bool = True, verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s file name in a private folder beside it; on success the
    file is checked (``verify(tmp)`` may raise), fsync'ed, given normal permissions and renamed to ``path``.

    On any error, cancel or signal nothing is left behind. ``overwrite=False`` refuses an existing
    ``path``, before the work and again at the rename. OS errors become :class:`WriteError`.
    """
    with _deferred(Path(path), overwrite) as pending:
        yield pending.path
        if verify is not None and pending.path.is_file():
            verify(pending.path)
        pending.commit()


@contextmanager
def atomic_outputs(paths, overwrite: bool = True) -> Iterator[list]:
    """:func:`atomic_output` for files that belong together (a label map and its ``.labels.json``).

    Yields one temporary path per output; they are renamed in the given order only after the whole
    block succeeded, and if a later rename fails the files already renamed are removed again.
    """
    paths = [Path(p) for p in paths]
    with ExitStack() as stack:
        temporaries = [stack.enter_context(_deferred(p, overwrite)) for p in paths]
        yield [t.path for t in temporaries]
        done = []
        try:
            for t in temporaries:
                t.commit()
                done.append(t)
        except BaseException:
            for t in done:
                t.undo()
            raise


class _Deferred:
    def __init__(self, tmp: Path, final: Path, overwrite: bool):
        self.path, self.final, self.overwrite, self.committed = tmp, final, overwrite, False

    def commit(self) -> None:
        try:
            if self.path.is_symlink() or not self.path.is_file():
                raise WriteError(errno.EIO, f"writing {self.final} produced no file")
            _fsync_file(self.path)
            os.chmod(self.path, _default_mode())
            _commit(self.path, self.final, self.overwrite)
            fsync_dir(self.final.parent)
        except OSError as e:
            if isinstance(e, WriteError):
                raise
            raise WriteError(_errno_of(e), describe_os_error(e, self.final)) from None
        self.committed = True

    def undo(self) -> None:
        try:
            self.final.unlink()
        except OSError:
            pass


@contextmanager
def _deferred(path: Path, overwrite: bool) -> Iterator[_Deferred]:
    if path.is_dir():
        raise FileSafetyError(f"{path} is a folder: give a file name")
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path} exists already: choose another name, or add --overwrite")
    with temporary_folder(path.parent, for_path=path) as private:
        try:
            yield _Deferred(private / path.name, path, overwrite)
        except OSError as e:
            if isinstance(e, WriteError):
                raise
            raise WriteError(_errno_of(e), describe_os_error(e, path)) from None


@contextmanager
def temporary_folder(parent, purpose: str = "", for_path=None) -> Iterator[Path]:
    """:func:`private_folder` in ``parent`` (created if needed) for the ``with`` block, removed at its end:
    on success, error, cancel, SIGINT or SIGTERM.

    The folder's name is chosen before it is created, so that an exception raised by a signal handler
    at any point (even the moment ``mkdir`` returns, as Slicer's Cancel can arrive when the folder
    appears) finds the name and removes the folder. No signal mask is involved: a process-directed
    signal may be taken by any thread, and Python runs its handler in the main thread regardless.
    ``for_path`` names the output in a :class:`WriteError`.
    """
    parent = Path(parent)
    folder = None
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_temporaries(parent)
            while True:
                folder = _private_name(parent, purpose)  # named first: see the docstring
                try:
                    os.mkdir(folder, 0o700)
                    break
                except FileExistsError:  # not ours (a 128-bit random name makes this theoretical)
                    folder = None
        except OSError as e:
            raise WriteError(_errno_of(e), describe_os_error(e, for_path or parent / "output")) from None
        with _live_lock:
            _live.add(str(folder))
        yield folder
    finally:
        if folder is not None:
            try:
                remove_tree(folder, parent, "temporary folder")
            except OSError:  # not created (interrupted before mkdir) or already gone
                pass
            with _live_lock:
                _live.discard(str(folder))


def _private_name(parent: Path, purpose: str) -> Path:
    return parent / f"{TEMP_PREFIX}{_owner_tag()}{secrets.token_hex(16)}{purpose}"


def host_tag() -> str:
    """This computer's name as it appears in private temporary folder names (see :func:`_owner_tag`)."""
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:32] or "host"


def _owner_tag() -> str:
    """``HOST-PID-``: names a private temporary folder after the process that owns it (see the sweep below)."""
    return f"{host_tag()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def private_folder(parent, purpose: str = "") -> Path:
    """A new folder in ``parent`` that only this user can enter (random 128-bit name, mode 0700, created exclusively),
    named ``.ctfm-tmp-HOST-PID-...`` so that a later writer can remove it if this process is killed.

    Stale folders of killed writers in ``parent`` are swept first. The caller removes the folder
    (:func:`remove_tree` with ``parent`` as the root).
    """
    parent = Path(parent)
    sweep_stale_temporaries(parent)
    while True:
        folder = _private_name(parent, purpose)
        try:
            os.mkdir(folder, 0o700)
            return folder
        except FileExistsError:
            continue


def sweep_stale_temporaries(folder) -> list:
    """Remove the private temporary folders in ``folder`` whose writer was killed (SIGKILL cannot be
    cleaned up after): ``.ctfm-tmp-HOST-PID-*`` of this computer whose process no longer runs.

    Folders of other computers (a shared network folder) and of running processes are left alone;
    on Windows nothing is swept (checking a process there could stop it). Returns what was removed.
    """
    if os.name != "posix":
        return []
    removed = []
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    host = host_tag()
    for name in entries:
        parts = name[len(TEMP_PREFIX):].split("-", 2)  # HOST-PID-RANDOM[purpose] (HOST has no "-")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            remove_tree(Path(folder) / name, folder, "temporary folder")
            removed.append(name)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`; returns ``path``."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)


def read_json_object(path) -> dict:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object: for small caches
    this package writes itself (timings, costs), where a damaged file only means measuring again."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_text(path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


# --- outputs against inputs -----------------------------------------------------------------------


def same_file(a, b) -> bool:
    """Whether two paths name one file: equal after resolving links, or the same inode (hard links)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_outputs(outputs: Iterable, inputs: Iterable = (), overwrite: bool = False) -> None:
    """Refuse outputs that would harm the user's files; call before any work.

    Each output must not be (or lie inside) one of ``inputs`` (files or folders; compared after
    resolving links, hard links included), must not be an existing folder, must not repeat another
    output, and must not exist unless ``overwrite``.
    """
    inputs = [Path(p) for p in inputs if p is not None and str(p)]
    seen = {}
    for out in outputs:
        out = Path(out)
        for source in inputs:
            if same_file(out, source):
                raise FileSafetyError(f"the output {out} is the input {source}: write the result elsewhere")
        for source in inputs:
            if source.is_dir() and os.path.lexists(out) and is_inside(out, source):
                raise FileSafetyError(f"the output {out} is a file of the input folder {source}: write the "
                                      "result elsewhere")
        if out.is_dir():
            raise FileSafetyError(f"the output {out} is an existing folder: give a file name")
        key = str(out.resolve())
        if key in seen:
            raise FileSafetyError(f"two outputs are the same file: {seen[key]} and {out}")
        seen[key] = out
        if not overwrite and os.path.lexists(out):
            raise OutputExistsError(f"{out} exists already: choose another name, or add --overwrite")


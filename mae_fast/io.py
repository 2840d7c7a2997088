"""Writing outputs safely: atomic writes, and one writer per output.

Atomic writes: a file (or a folder) is written under a temporary name beside its destination (`TMP_PREFIX`), fsynced
and renamed into place, so a reader never sees half a file and a killed writer leaves only a temporary, which
`remove_temporaries` clears. Checkpoints, tables, JSON results and packs all go through `atomic_write`.

One writer per output: an exclusive lock held for a command's lifetime by `train`, `embed`, `pack` and `evaluate`.

The lock is a small file (a folder output: `DIR/.mae_fast.lock`; a file or a folder replaced as a whole: `PATH.lock`
beside it) locked with flock(2) and holding who took it (pid, host, start time). A second writer fails at once
with one line naming the holder. The kernel drops the lock when its process dies, so a lock file left by a killed
run is simply taken over (and said so); when the holder named in the file is dead on this host but the lock is
still held (a forked worker of the killed run has not exited yet), the file is replaced and taken over too.

Limits. flock is advisory: it only stops writers that also take it (every mae_fast command does). On NFS, Linux
implements flock with the server's byte-range locks (NFSv4, or NFSv3 with lockd), so two hosts exclude each other;
a dead client's lock is only freed when the server's lease expires (about 90 s on NFSv4), and a holder on another
host is never declared stale (its pid cannot be checked from here). Some filesystems (old NFS without lockd, some
FUSE mounts) refuse locks: there the command warns once and runs without the guarantee.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # temporaries of atomic writes (files and folders); only a killed writer leaves one


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temp file beside `path`, fsync it, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as err:  # a writer library's own error (SafetensorError, ArrowIOError) included
            if is_disk_full(err):
                raise disk_full_error(directory, f"writing {os.path.basename(path)}") from err
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota, as an OSError or as the message of a library's own exception type."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in ("No space left on device", "Disk quota exceeded"))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def free_bytes(folder: str) -> int | None:
    """Free space of the filesystem holding `folder` (or its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(folder: str, doing: str, needed: int | None = None,
                    then: str = "run the command again") -> OSError:
    """The one-line error of a full disk: the folder, what was being written, the space free and needed."""
    free = free_bytes(folder)
    text = (f"no space left on the device {doing}"
            + (f": about {_mib(needed)} needed" if needed else "")
            + (f"{';' if needed else ':'} {_mib(free)} free" if free is not None else "")
            + f"; free some space (or write elsewhere), then {then}")
    return OSError(errno.ENOSPC, text, folder)


def remove_temporaries(folder: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Remove what killed writers left in `folder` (`.tmp-*` files and folders; with `names`, only the temporaries
    of those files); call it only while holding the output's lock (`OutputLock` below), when no other writer of
    those files can be mid-write. Returns what was removed."""
    removed = []
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.name.startswith(TMP_PREFIX) and (names is None or entry.name.endswith(tuple("-" + n for n in names))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.remove(entry.path)
                removed.append(entry.path)
    return removed


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj, indent: int = 2) -> str:
    """`obj` as JSON at `path`, atomically (numpy scalars and other objects via .item() or str)."""
    text = json.dumps(obj, indent=indent, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n"
    atomic_write(path, lambda tmp: write_text(tmp, text))
    return path


LOCK_NAME = ".mae_fast.lock"


class OutputBusyError(RuntimeError):
    """Another process writes to the same output."""


def folder_lock_path(folder: str) -> str:
    """The lock of an output folder that is written into (a training run, an evaluation)."""
    return os.path.join(folder, LOCK_NAME)


def beside_lock_path(path: str) -> str:
    """The lock of an output replaced as a whole (a pack folder) or of a table and its sibling files (embed)."""
    return os.path.normpath(path) + ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {started}: {holder.get('command', '?')})"


def _dead_here(holder: dict) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))


class OutputLock:
    """An exclusive lock on one output, taken on construction (see the module doc); `release()` (or the `with`
    block's end) removes it. `took_over` describes the stale holder replaced, if any."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self.took_over: str | None = None
        self._fd: int | None = None
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, f"exists and is not a folder, so {what} cannot be written",
                                     folder)  # shown as "FOLDER: exists and is not a folder, so ..."
        self._made_folder = None if os.path.isdir(folder) else folder  # removed again if left empty
        os.makedirs(folder, exist_ok=True)
        for _ in range(20):  # retried only when the file was replaced between opening and locking it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    logger.warning(f"{path}: this filesystem refuses file locks ({err.strerror}); {what} runs without "
                        "the one-writer guarantee")
                    return
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = _holder(path)
                if _dead_here(holder):  # the killed holder's forked children may still hold it: replace the file
                    self.took_over = _describe(holder)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                    continue
                raise OutputBusyError(f"{what} is in use by {_describe(holder)} (lock {path}); wait for it to "
                                      "finish or write elsewhere") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file while we opened it: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            break
        else:
            raise OutputBusyError(f"{what}: could not take the lock {path} (it keeps being replaced)")
        previous = _holder(path)
        if previous and self.took_over is None:
            self.took_over = _describe(previous)
        if self.took_over:
            logger.warning(f"took over the stale lock of {self.took_over}, which is no longer running ({path})")
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        program = "mae-fast" if program in ("cli.py", "__main__.py", "mae-fast") else program
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join([program, *sys.argv[1:4]])}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still locked: a waiter that opened the old file sees it replaced
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        if self._made_folder:  # a command that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self._made_folder)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------------------
# Output paths checked before any work: valid, and never an input (or a folder holding one)
# ------------------------------------------------------------------------------------------------------------

class OutputPathError(ValueError):
    """An output path that cannot be written, or whose writing would destroy an input."""


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _input_paths(path: str) -> list[str]:
    """An input as the paths it names (a glob's matches, else itself)."""
    if any(c in path for c in "*?["):
        import glob

        return glob.glob(path) or [path]
    return [path]


def check_output_path(path: str, what: str, *, kind: str = "folder") -> None:
    """An output's name usable before any work: UTF-8 text, and a file output (`kind="file"`) neither ending in a
    slash nor naming an existing folder."""
    if not path:
        raise OutputPathError(f"{what} is empty: give a path")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as err:
        raise OutputPathError(f"{what} {path!r} is not valid UTF-8 text (it holds the byte "
                              f"0x{ord(path[err.start]) & 0xff:02x}); choose another name") from None
    if kind == "file" and (path.endswith(os.sep) or os.path.isdir(path)):
        raise OutputPathError(f"{what} {path} is a folder; give a file name, e.g. "
                              f"{os.path.join(path, 'embeddings.parquet')}")


def refuse_overwriting_inputs(output: str, inputs: dict, what: str = "--out") -> None:
    """Refuse an output that is one of the command's inputs, or a folder holding one: writing (or --overwrite)
    would destroy what the command reads. `inputs` maps a name (e.g. "--source") to a path (None: not given)."""
    out = _resolved(output)
    inside = out.rstrip(os.sep) + os.sep
    for name, given in inputs.items():
        for path in _input_paths(str(given)) if given else []:
            real = _resolved(path)
            if real == out:
                raise OutputPathError(f"{what} {output} is the input {name} {given}; refusing to overwrite an "
                                      "input: write the output elsewhere")
            if real.startswith(inside):
                raise OutputPathError(f"{what} {output} holds the input {name} {given}; refusing to replace a "
                                      "folder that contains an input: write the output elsewhere")

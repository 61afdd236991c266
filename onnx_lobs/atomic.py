"""Files that appear whole or not at all: written out of sight in the target's folder, then
renamed into place, several files (a model and its external data) in order, with SIGINT,
SIGTERM and SIGHUP held back from the first rename to the last.

Where the system offers anonymous files (Linux O_TMPFILE), a write cut short leaves nothing
behind even under SIGKILL: a file gets a hidden name only just before its rename. Elsewhere it
is a hidden temporary file, removed on any error or Ctrl-C (a SIGKILL leaves it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading

from .errors import LobsError

TEMP_PREFIX = ".onnx-lobs-"


def write_atomic(path: str, data: bytes) -> None:
    """One file (a report, say), written like a model."""
    publish(path, [(os.path.basename(path), lambda f: f.write(data))])


def publish(path: str, writers: list) -> None:
    """Stage each (name, write(file)) in path's folder, in order, then put them all in place."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise LobsError(f"{path}: output folder does not exist")
    staged: list[_Staged] = []
    try:
        for name, write in writers:
            staged.append(_Staged(folder, name))
            with staged[-1].open() as f:
                write(f)
        with _signals_held():
            _commit_all(staged)
    except OSError as e:
        raise LobsError(f"{path}: cannot write there ({e.strerror or type(e).__name__})") from None
    finally:
        with _signals_held():
            for s in staged:
                s.discard()


def _commit_all(staged: list) -> None:
    """Put every staged file in place; if one fails, take back those that were new."""
    done = []
    try:
        for s in staged:
            new = not os.path.exists(s.path)
            s.commit()
            done.append((s, new))
    except BaseException:
        for s, new in done:
            if new:
                with contextlib.suppress(OSError):
                    os.unlink(s.path)
        raise


class _Staged:
    """One output file, written where no one sees it, then put in place in one step."""

    def __init__(self, folder: str, name: str):
        self.folder, self.path, self.tmp = folder, os.path.join(folder, name), None
        try:  # anonymous until linked: the kernel frees it if we die first
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
        except (AttributeError, OSError):  # no O_TMPFILE here: a hidden named file
            self.fd, self.tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(self.fd, 0o666 & ~mask)  # what a plain open() would have given

    def open(self):
        return os.fdopen(self.fd, "wb", closefd=False)

    def commit(self) -> None:
        """Give the file a hidden name (anonymous files only), then rename it over the target."""
        if self.tmp is None:
            try:
                self.tmp = self._link_hidden()
            except OSError:  # no /proc to link through: copy into a hidden named file
                self.tmp = self._copy_hidden()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def _link_hidden(self) -> str:
        tmp = os.path.join(self.folder, TEMP_PREFIX + secrets.token_hex(8))
        dfd = os.open(self.folder, os.O_RDONLY)
        try:  # (a dir_fd makes os.link use linkat, which follows the /proc link to the open file)
            os.link(f"/proc/self/fd/{self.fd}", tmp, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
        return tmp

    def _copy_hidden(self) -> str:
        tmp = os.path.join(self.folder, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.tmp = tmp  # removed by discard() should the copy fail
        with os.fdopen(fd, "wb") as dst, os.fdopen(os.dup(self.fd), "rb") as src:
            src.seek(0)
            shutil.copyfileobj(src, dst, 1 << 24)
        return tmp

    def discard(self) -> None:
        """Remove what was not committed; close the file."""
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _signals_held():
    """Hold back SIGINT, SIGTERM and SIGHUP (raised again on exit) so that a multi-file commit, or
    the cleanup after a failure, is not cut in the middle. Python-level handlers, not a signal
    mask: onnxruntime's and BLAS's threads would take a masked signal for the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    held = [getattr(signal, n) for n in names if hasattr(signal, n)]
    held = [s for s in held if signal.getsignal(s) is not None]  # None: a handler Python cannot restore
    old = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)

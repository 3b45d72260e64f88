"""Lock files: one writer per output file.

Two processes appending to the same search shard would each rewrite the file with their own
samples, and one of them would silently lose the other's work. A writer therefore holds
``<file>.lock`` while it runs. The lock file is created atomically (a complete temporary file is
hard-linked into place, which fails if the lock exists) and holds the owner's pid, host name and
start time, so a second writer can say who holds it.

A lock left behind by a process that died (SIGKILL, power loss) must not block the rerun that
resumes its work: when the recorded process is on this host and no longer runs, the lock is taken
over, with a message. A lock held by a live process, or by a process on another host (whose
liveness cannot be checked from here), is an error naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from polar.errors import PolarError

try:  # POSIX: serialises the take-over of a stale lock between two would-be owners
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class LockedError(PolarError):
    """Another live process holds the lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded in the lock file."""

    pid: int
    host: str
    started: str
    process_start: str | None = None  # the pid's start time (Linux), to tell a reused pid apart

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


def lock_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.lock")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing ")"
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _this_holder() -> Holder:
    return Holder(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        process_start=_process_start(os.getpid()),
    )


def read_holder(lock: Path) -> Holder | None:
    """The holder recorded in ``lock``; None if there is no lock. A lock file that does not hold
    a readable record is reported as held by pid 0 on an unknown host (never taken over)."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), data.get("process_start"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(0, "an unknown host (unreadable lock file)", "unknown")


def is_alive(holder: Holder) -> bool:
    """Whether the holder may still run. Only a process on this host can be checked; a pid that
    now belongs to a process started later than the holder counts as dead."""
    if holder.host != socket.gethostname() or holder.pid <= 0:
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if holder.process_start is not None:
        now = _process_start(holder.pid)
        if now is not None and now != holder.process_start:
            return False  # the pid was reused
    return True


def _create(lock: Path, holder: Holder) -> bool:
    """Create ``lock`` holding ``holder``, atomically and complete; False if it already exists."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", suffix=".tmp", dir=lock.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(holder.__dict__, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, lock)  # fails with FileExistsError if a lock is there
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: fall back to O_EXCL
            try:
                fd2 = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w", encoding="utf-8") as handle:
                json.dump(holder.__dict__, handle)
        return True
    finally:
        os.unlink(tmp)


def _take_over_if_stale(lock: Path, log: Callable[[str], None]) -> None:
    """Remove ``lock`` if its holder is dead; raise :class:`LockedError` if it is alive.

    The check and the removal happen under ``flock`` on the lock file itself, and only if the
    path still names the file that was checked, so two processes that both find the same stale
    lock cannot both take it (the second one finds the first one's fresh lock instead).
    """
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return  # released meanwhile: try to create it again
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                return  # replaced meanwhile: look again
        except FileNotFoundError:
            return
        holder = read_holder(lock)
        if holder is None:
            return
        if is_alive(holder):
            where = "" if holder.host == socket.gethostname() else " (another host: cannot check whether it still runs)"
            raise LockedError(
                f"{lock.with_suffix('')} is being written by {holder.describe()}{where}; wait for it to finish, "
                f"or delete {lock} if no such process runs"
            )
        log(f"taking over the stale lock {lock} left by {holder.describe()}, which no longer runs")
        os.unlink(lock)
    finally:
        os.close(fd)


def acquire(path: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Take the lock of ``path`` (``<path>.lock``) or raise :class:`LockedError`."""
    lock = lock_path(path)
    holder = _this_holder()
    for _ in range(50):
        if _create(lock, holder):
            return lock
        _take_over_if_stale(lock, log)
    raise LockedError(f"{lock}: could not take the lock (it keeps changing hands)")


def release(lock: Path) -> None:
    """Remove ``lock`` if this process still holds it (never someone else's)."""
    holder = read_holder(lock)
    if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def hold(path: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[Path]:
    """``with hold(file):`` the body is the only writer of ``file`` among processes that lock it."""
    lock = acquire(path, log)
    try:
        yield lock
    finally:
        release(lock)

"""Wake-ups instead of fast polls between two processes of one machine.

On the deployment engine two waits are polls of a local HTTP API: each site's worker asks its own
SuperNode for a task (Flower's Runtime API), and the coordinator's ServerApp asks its SuperLink for
the sites' replies. Polled every 0.1 s and 0.05 s, they cost CPU for as long as anyone waited: an
idle site's worker asked its SuperNode 10 times a second (6,692 acquire-task requests in about 11
idle minutes, each a few milliseconds of FastAPI's CPU). Measured, this saves that CPU; it did not
change a round's time on 2 cores (README "Round time").

Here the waiting process opens a Unix datagram socket in a private temporary folder and passes its
path to the other process (SPINE_FL_WAKEUP_SOCKET); that process sends one byte whenever the
awaited thing happens (the SuperNode has a whole message for the worker, the SuperLink stores a
reply), and the waiter asks at once. The poll stays as a fallback at a slower pace (`Wakeup.wait`'s timeout), so a lost
or missing wake-up costs time, never a message. A wake-up carries nothing, and only a process that
can reach the socket (in a folder only the owner can open) can send one.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
from functools import wraps
from pathlib import Path
from typing import Any, Callable

ENV = "SPINE_FL_WAKEUP_SOCKET"
PREFIX = "spine-fl-wake-"  # then the waiting process's PID: a folder a killed waiter left is removed later
WOKEN_POLL_SECONDS = 0.5  # the fallback poll of a wait that wake-ups end early


class Wakeup:
    """The receiving end: a Unix datagram socket at `path`, removed with its folder on close."""

    def __init__(self) -> None:
        _remove_left_behind()
        self.folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")  # 0700: only this user can send
        self.path = os.path.join(self.folder, "wake")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)

    def wait(self, seconds: float) -> bool:
        """Return when woken (every wake-up sent so far is consumed) or after `seconds`; whether woken."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, seconds))
        while ready:
            try:
                self._sock.recv(64)
            except BlockingIOError:
                break
        return bool(ready)

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _remove_left_behind() -> None:
    """Remove the folders of this user's waiters that died without closing (SIGKILL): the creator's
    PID is in the name; a folder whose PID still runs (or is not ours to ask) is kept."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # not ours, or gone meanwhile
            continue


def open_wakeup() -> Wakeup | None:
    """A Wakeup, or None where Unix sockets are not available (the waits then stay plain polls)."""
    try:
        return Wakeup()
    except (AttributeError, OSError):
        return None


def env_for(wake: Wakeup | None) -> dict[str, str]:
    """The environment that tells a child process where to send its wake-ups."""
    return {} if wake is None else {ENV: wake.path}


def _notifier() -> Callable[[], None]:
    path = os.environ.get(ENV)
    if not path or not hasattr(socket, "AF_UNIX"):
        return lambda: None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)

    def notify() -> None:
        try:
            sock.sendto(b"!", path)
        except OSError:  # nobody waiting (gone, not started), or its queue is full: it will poll
            pass

    return notify


def wake_after(owner: object, name: str) -> None:
    """In the sending process: the function `owner.name` (a class's method or a module's function)
    wakes the waiter (SPINE_FL_WAKEUP_SOCKET) after each call that returns something (Flower's
    functions here return None when they stored nothing)."""
    original = getattr(owner, name)
    if getattr(original, "_spine_fl_wakes", False):
        return
    notify = _notifier()

    @wraps(original)
    def waking(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if result is not None:
            notify()
        return result

    waking._spine_fl_wakes = True  # type: ignore[attr-defined]
    setattr(owner, name, waking)

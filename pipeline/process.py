"""One way to start and stop the pipeline's processes from Python (bench, tests), optionally in a network namespace.

:func:`start` runs a command with its output in a log file, in a session of
its own (so a stop reaches every child: ``honcho``'s processes, or the
program that ``ip netns exec`` or a wrapper such as ``faketime`` runs), and
returns a :class:`Process`. ``netns="h1"`` runs it as
``ip netns exec h1 ...`` (the namespace must exist; see ``pipeline/netns.py``);
``wrap`` puts a prefix such as ``["faketime", "-f", "+30s"]`` before the
command, inside the namespace. :meth:`Process.stop` sends a signal to the
whole group, waits, and kills after a bound; :func:`stop_all` stops several at
once within one bound. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pipeline.log import get_logger

#: SIGTERM to SIGKILL (workers drain within about 3 s; honcho itself waits 5 s).
STOP_TIMEOUT_S = 8.0
#: after SIGKILL, the wait for the kernel to reap it.
KILL_WAIT_S = 10.0
#: the command that runs a program inside a named network namespace.
NETNS_EXEC = ("ip", "netns", "exec")

log = get_logger("pipeline.process")


def pipeline_command(*args: str) -> list[str]:
    """``python -m pipeline.cli ARGS`` with this interpreter (the CLI imports only the chosen command)."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def command(argv: Sequence[str], *, netns: str | None = None, wrap: Sequence[str] = ()) -> list[str]:
    """The full command line: ``ip netns exec NETNS`` (when given), then ``wrap``, then ``argv``."""
    if not argv:
        raise ValueError("expected a command to run, received an empty argv")
    return [*(NETNS_EXEC + (netns,) if netns else ()), *wrap, *argv]


@dataclasses.dataclass
class Process:
    """A started process: its ``Popen`` (``proc``), the file its output goes to, and where it runs."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    netns: str | None = None
    group: bool = True  # it leads a session of its own: signals go to the whole group

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def text(self) -> str:
        """Everything it has written so far ("" when the log cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """Its last lines of output under a header naming it, for a failing test's message."""
        where = f" in netns {self.netns}" if self.netns else ""
        body = "\n".join(self.text().splitlines()[-lines:])
        return f"--- {self.name}{where} (pid {self.pid}, exit {self.returncode}, {self.log_path}) ---\n{body}"

    def send_signal(self, sig: int) -> None:
        """Signal it (its whole group when it leads one); a process already gone is not an error."""
        if not self.alive:
            return
        try:
            if self.group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> int | None:
        """SIGKILL (the group) and reap it."""
        self.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("process_unkillable", name=self.name, pid=self.pid)
        return self.returncode

    def wait(self, timeout_s: float) -> int | None:
        """Its exit status, or ``None`` if it is still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig``, wait up to ``timeout_s``, then SIGKILL; return the exit status."""
        if self.alive:
            self.send_signal(sig)
            if self.wait(timeout_s) is None:
                log.warning("process_killed", name=self.name, pid=self.pid, after_s=timeout_s)
                self.kill()
        elif self.group:
            self._kill_stragglers()
        return self.returncode

    def _kill_stragglers(self) -> None:
        """A wrapper that exited may leave children in its group (a crashed honcho): kill them."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    netns: str | None = None,
    wrap: Sequence[str] = (),
    group: bool = True,
) -> Process:
    """Start ``argv`` (in ``netns``, behind ``wrap``) with stdout and stderr in a new file under ``log_dir``.

    ``env`` is the whole environment (default: this process's, unbuffered).
    ``group=False`` keeps it in the caller's session (signals reach only it).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    full = command(argv, netns=netns, wrap=wrap)
    environment = dict(env) if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=cwd, start_new_session=group)
    log.debug("process_started", name=name, pid=proc.pid, netns=netns, argv=full)
    return Process(name, proc, log_path, netns=netns, group=group)


def stop_all(processes: Iterable[Process], sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int | None]:
    """Signal them all at once, wait within one ``timeout_s`` for all, SIGKILL the rest; return exit statuses."""
    procs = list(processes)
    for p in procs:
        p.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for p in procs:
        if p.wait(max(0.1, deadline - time.monotonic())) is None:
            log.warning("process_killed", name=p.name, pid=p.pid, after_s=timeout_s)
            p.kill()
        elif p.group:
            p._kill_stragglers()
        codes[p.name] = p.returncode
    return codes

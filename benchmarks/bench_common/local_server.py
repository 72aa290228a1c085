"""A ``segformer-fast serve`` process on this machine, for ``bench_serve.py`` and the service's tests: start it on a
free loopback port with its own Ray session folder, wait until it is ready, call it, and stop it, checking that
every process it started has ended. Only the standard library: a caller needs neither Ray nor an HTTP client package.

Processes are followed by PID: the server's descendants (found from ``/proc``) and every process whose command line
names the server's own Ray session folder (Ray's daemons and workers do), each recorded with its start time so a
reused PID is never mistaken for one of ours. Nothing is ever ended by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

READY_MARK = "segformer-fast serve: ready at "


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (``/proc/PID/stat`` field 22), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _all_processes() -> dict:
    """pid -> (parent pid, command line) for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, IndexError, ValueError):
            continue
        table[pid] = (parent, command)
    return table


def process_tree(root: int, marker: str | None = None) -> dict:
    """{pid: (start time, command line)} of ``root``'s descendants and of every process whose command line holds
    ``marker`` (the server's Ray session folder)."""
    table = _all_processes()
    children: dict = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    if marker:
        found.update(pid for pid, (_, command) in table.items() if marker in command and pid != os.getpid())
    tree = {}
    for pid in found:
        started = _proc_start_time(pid)
        if started is not None:
            tree[pid] = (started, table[pid][1])
    return tree


def alive(processes: dict) -> dict:
    """The entries of ``processes`` ({pid: (start time, command)}) still running as the same process."""
    return {pid: info for pid, info in processes.items() if _proc_start_time(pid) == info[0]}


class LocalServer:
    """``segformer-fast serve --model MODEL`` on 127.0.0.1 at a free port, with a Ray session folder of its own.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``args``: more options of the command. The output
    of the server goes to ``log_path`` (default: a file in the session folder)."""

    def __init__(self, model, args: Iterable[str] = (), *, port: int | None = None, temp_dir=None,
                 log_path=None, env: dict | None = None, start_timeout_s: float = 240.0):
        self.model = str(model)
        self.args = [str(arg) for arg in args]
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._own_temp_dir = temp_dir is None
        # short: Ray puts Unix sockets under it, whose paths may not exceed 107 bytes
        self.temp_dir = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="sfserve-", dir="/tmp"))
        self.log_path = Path(log_path) if log_path else self.temp_dir / "server.log"
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.seen: dict = {}
        self.ready_line = ""
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "segformer_fast", "serve", "--model", self.model, "--host", self.host,
                "--port", str(self.port), "--temp-dir", str(self.temp_dir), *self.args]

    def start(self) -> LocalServer:
        """Start the server and return once it printed that it is ready; RuntimeError (with the end of its log)
        when it exits first or takes longer than ``start_timeout_s``."""
        env = dict(os.environ if self.env is None else self.env)
        env.pop("RAY_ADDRESS", None)  # its own local Ray, never a cluster that happens to be configured
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self.track()
            text = self.log_text()
            if READY_MARK in text:
                self.ready_line = next(line for line in text.splitlines() if READY_MARK in line)
                return self
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"segformer-fast serve exited with {self.process.returncode} before it was "
                                   f"ready:\n{self.log_tail()}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"segformer-fast serve not ready within {self.start_timeout_s} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def track(self) -> dict:
        """Record the processes the server has started so far (also called by :meth:`stop`); returns them all."""
        if self.process is not None:
            with self._lock:
                self.seen.update(process_tree(self.process.pid, str(self.temp_dir)))
        return self.seen

    def find(self, text: str) -> list[int]:
        """PIDs of the server's live processes whose command line holds ``text`` (``"SegmentModel"``: the model
        replicas, whose process titles name their deployment)."""
        self.track()
        return sorted(pid for pid, (_, command) in alive(self.seen).items() if text in command)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> dict:
        """Send ``sig`` to the server, wait for it and for every process it started to end. Returns the processes
        still running after ``timeout_s`` (then ended with SIGKILL, by PID); empty after a clean shutdown."""
        if self.process is None:
            return {}
        self.track()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        left = alive(self.seen)
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = alive(self.seen)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in alive(left):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        return left

    def cleanup(self) -> None:
        """Remove the session folder this object made (after :meth:`stop`)."""
        if self._own_temp_dir:
            import shutil

            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self.cleanup()

    # ------------------------------------------------------------------------------------------------- calling it
    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout_s: float = 60.0) -> tuple[int, dict, bytes]:
        """One HTTP request on a new connection: (status, headers with lower-case names, body)."""
        return http_call(self.host, self.port, method, path, body, headers, timeout_s)


def http_call(host: str, port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout_s: float = 60.0) -> tuple[int, dict, bytes]:
    """One HTTP request on a new connection: (status, headers with lower-case names, body). A server that answers
    before it has read the whole body (413) may reset the connection while it is being sent: its answer is read
    all the same."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        try:
            connection.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, response.read()
    finally:
        connection.close()

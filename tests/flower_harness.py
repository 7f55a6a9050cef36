"""Real Flower processes for tests: a SuperLink, SuperNodes and `flwr run`, on 127.0.0.1.

Every process starts in its own session (process group) and is stopped by `Deployment.stop`,
which the tests call in a `finally`; every wait is bounded. Ports are picked free at run time,
FLWR_HOME is a temporary folder, so two runs on one machine do not collide.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.federation.flower import deploy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[0]} exited with {p.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Deployment:
    """A SuperLink and its SuperNodes, each a separate process, logs in `root`."""

    def __init__(self, root: Path, src: Path):
        self.root = root
        self.home = root / "flwr-home"
        self.env = deploy.flower_env()
        self.env["FLWR_HOME"] = str(self.home)
        self.env["PYTHONPATH"] = os.pathsep.join([str(src), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env["TOKENIZERS_PARALLELISM"] = "false"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def superlink(self, **kw) -> None:
        proc = self.start("superlink", deploy.superlink_command(port=self.port, **kw))
        wait_for(lambda: port_open(self.port), 60, "SuperLink port", [proc])

    def supernode(self, name: str, node_config: dict, **kw) -> None:
        """A site; it consents to seeded noise, so the tests' runs compare bit for bit."""
        node_config = {"allow-seeded-noise": True, **node_config}
        self.start(name, deploy.supernode_command(superlink=self.address, port=free_port(),
                                                  node_config=node_config, **kw))

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """A `flwr` CLI call, bounded by `timeout` (its process group is killed past it)."""
        exe = str(Path(sys.executable).parent / "flwr")
        proc = self.start(f"flwr-{len(self.procs)}", [exe, *args])
        try:
            proc.wait(timeout=timeout)
        finally:
            self.kill(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal `proc`'s process group and everything below it (by pid), and reap it."""
        pids = descendants(proc.pid)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        _signal(pids, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def processes(self, command: str) -> list[int]:
        """Pids of the processes below this deployment's whose command line names `command`
        (e.g. the ServerApp process, `flwr-serverapp`, that the SuperLink starts per run)."""
        found = []
        for pid in sorted({d for proc in self.procs.values() for d in descendants(proc.pid)}):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(a.decode(errors="replace")).name == command for a in argv[:2]):
                found.append(pid)
        return found

    def stop(self) -> None:
        """Stop everything this deployment started, and everything those started (Flower
        detaches some children into their own sessions): SIGTERM, then SIGKILL, by pid."""
        pids = {d for proc in self.procs.values() for d in descendants(proc.pid)}
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: ServerApp/ClientApp children too
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _signal(pids, signal.SIGKILL)


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc; Linux), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found

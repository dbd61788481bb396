"""A real Milvus standalone server for the tests, from the PyPI package ``milvus==2.3.5``.

The package's launcher (``milvus-server``) unpacks the server into its data folder, writes
its config and runs it with embedded etcd and local storage. Three things it does not do
for us, done here:

* ports: the launcher treats ``--proxy-port`` and friends as a starting point and silently
  moves to the next free port, so the port actually used is read back from the config it
  writes; embedded etcd always listens on 2379/2380 unless ``$ETCD_CONFIG_PATH`` names a
  config with other URLs, which is what lets two servers (two test sessions) run at once;
* readiness: the launcher keeps waiting when the server process has crashed, so a crash is
  spotted in the server's log;
* stopping: killing the launcher leaves the server running (for minutes after SIGTERM), so
  both run in their own process group, which gets SIGTERM and then SIGKILL.

A server restarted after SIGKILL answers queries only once the old process's etcd session
has expired (``common.session.ttl``, 30 s by default): the tests use 10 s.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

#: the launcher's port options (each needs a free port: defaults clash with another server)
PORT_FLAGS = (
    "proxy-port", "proxy-internal-port", "etcd-port", "root-coord-port", "query-coord-port",
    "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port",
)
#: ``--extra-config`` settings (keys already in the launcher's config template)
EXTRA_CONFIG = {"common.session.ttl": 10}
_LAUNCH = "import sys, milvus; sys.argv[0] = 'milvus-server'; sys.exit(milvus.main())"


class ServerError(RuntimeError):
    """The server could not be started (the message ends with its log's last lines)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on right now (held together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MilvusServer:
    """One Milvus standalone server with its data in ``data_dir``; restartable on that data.

    ``start()`` returns once the server answers (or raises :class:`ServerError`), ``stop()``
    ends every process it started; ``uri`` is the address to give the ``milvus`` backend.
    """

    def __init__(self, data_dir: str | os.PathLike, startup_timeout: float = 120.0, grace: float = 5.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        ports = free_ports(len(PORT_FLAGS) + 2)
        self._ports = dict(zip(PORT_FLAGS, ports))
        self._etcd_config = self._write_etcd_config(*ports[-2:])

    @property
    def uri(self) -> str:
        if self.port is None:
            raise ServerError("the server is not running")
        return f"http://127.0.0.1:{self.port}"

    def _write_etcd_config(self, client_port: int, peer_port: int) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        path = self.data_dir / "etcd.yaml"
        path.write_text(yaml.safe_dump({
            "listen-client-urls": client, "advertise-client-urls": client,
            "listen-peer-urls": peer, "initial-advertise-peer-urls": peer,
            "initial-cluster": f"default={peer}",
        }))
        return path

    # -- start -----------------------------------------------------------------------

    def start(self) -> str:
        """Start (or restart) the server on ``data_dir``; its URI once it answers."""
        if self._proc is not None:
            raise ServerError("already started")
        config = self.data_dir / "configs" / "milvus.yaml"
        config.unlink(missing_ok=True)  # read back below: must be this start's
        args = [a for flag, port in self._ports.items() for a in (f"--{flag}", str(port))]
        args += [a for key, value in EXTRA_CONFIG.items() for a in ("--extra-config", f"{key}={value}")]
        logs = self.data_dir / "launcher.log"
        env = {**os.environ, "ETCD_CONFIG_PATH": str(self._etcd_config)}
        with open(logs, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "--data", str(self.data_dir), *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        try:
            self.port = self._wait_for_port(config)
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        log.info("Milvus server up at %s (data in %s)", self.uri, self.data_dir)
        return self.uri

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerError(f"the launcher exited with {self._proc.returncode}{self._log_tail()}")
        server_log = self.data_dir / "logs" / "milvus-stderr.log"
        if server_log.is_file() and b"\npanic: " in server_log.read_bytes():
            raise ServerError(f"the server crashed{self._log_tail()}")

    def _wait_for_port(self, config: Path) -> int:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
                return int(yaml.safe_load(config.read_text())["proxy"]["port"])
            time.sleep(0.2)
        raise ServerError(f"no config written in {self.startup_timeout:.0f} s{self._log_tail()}")

    def _wait_until_healthy(self) -> None:
        import pymilvus

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                client = pymilvus.MilvusClient(uri=self.uri, timeout=2)
                client.list_collections()
                client.close()
                return
            except pymilvus.MilvusException:
                time.sleep(0.5)
        raise ServerError(f"no answer at {self.uri} in {self.startup_timeout:.0f} s{self._log_tail()}")

    def _log_tail(self, n: int = 15) -> str:
        lines = []
        for name in ("launcher.log", "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.is_file():
                lines += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines()[-n:]]
        return ("\n" + "\n".join(lines)) if lines else ""

    # -- stop ------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``grace`` seconds."""
        proc, self._proc, self.port = self._proc, None, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 10.0)):
            if self._group_gone(proc, sig, wait):
                return
        log.warning("Milvus process group %d still alive after SIGKILL", proc.pid)

    @staticmethod
    def _group_gone(proc: subprocess.Popen, sig: int, wait: float) -> bool:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the launcher, else its zombie keeps the group "alive"
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> "MilvusServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Starts `flux serve` (the built binary) on a free port: one process on the SQLite store, and
two API nodes with a `flux worker` on a throw-away PostgreSQL cluster (when its binaries are
installed; required with FLUX_REQUIRE_POSTGRES=1 or CI set). Every test runs against each."""

import base64
import glob
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import zlib

import httpx
import pytest

API_KEY = "pytest-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flux_binary() -> str:
    path = os.environ.get("FLUX_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", "target")
        path = os.path.join(target, "debug", "flux")
    if not os.path.exists(path):
        pytest.fail(f"flux binary not found at {path}: build it (cargo build -p flux-cli) or set FLUX_BIN")
    return path


def png(width: int, height: int) -> bytes:
    """A small RGB PNG written by hand (no imaging library needed)."""
    raw = b"".join(
        b"\x00" + b"".join(bytes((x * 9 % 256, y * 5 % 256, 128)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def small_image() -> str:
    return base64.b64encode(png(16, 16)).decode()


@pytest.fixture(scope="session")
def broken_image() -> str:
    """A PNG whose header is intact but whose pixel data is cut off: it passes the request
    check and fails in the worker."""
    data = png(32, 32)
    idat = data.index(b"IDAT")
    return base64.b64encode(data[: idat + 20]).decode()


def _log_tail(log_name: str, lines: int = 40) -> str:
    """The end of a server log, for failure messages (the scratch folder holding it is removed
    when the fixture ends)."""
    try:
        with open(log_name, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {log_name}: {e})"


def _wait_healthy(proc, base: str, log_name: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flux exited with {proc.returncode}; its log ends:\n{_log_tail(log_name)}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"flux did not become healthy; its log ends:\n{_log_tail(log_name)}")


def _stop(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def sqlite_server():
    """One `flux serve` process (HTTP and workers) on the embedded SQLite store."""
    data_dir = tempfile.mkdtemp(prefix="flux-api-")
    port = _free_port()
    log = open(os.path.join(data_dir, "server.log"), "w")
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [_flux_binary(), "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data_dir, "--api-key", API_KEY],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(procs[0], base, log.name)
        yield base
    finally:
        _stop(procs)
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _postgres_bin():
    """The newest PostgreSQL server binaries (`FLUX_PG_BIN` or the distribution's)."""
    given = os.environ.get("FLUX_PG_BIN")
    if given:
        return given if os.path.exists(os.path.join(given, "initdb")) else None
    found = []
    for version in glob.glob("/usr/lib/postgresql/*"):
        name = os.path.basename(version)
        if name.isdigit() and os.path.exists(os.path.join(version, "bin", "initdb")):
            found.append((int(name), os.path.join(version, "bin")))
    return max(found)[1] if found else None


class _Postgres:
    """A throw-away PostgreSQL cluster on loopback (run as `postgres` when we are root, since
    initdb refuses root)."""

    def __init__(self, bin_dir: str):
        self.bin = bin_dir
        self.dir = tempfile.mkdtemp(prefix="flux-pg-")
        self.port = _free_port()
        self.prefix = []
        try:
            if os.geteuid() == 0:
                pw = pwd.getpwnam("postgres")
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
                self.prefix = ["runuser", "-u", "postgres", "--"]
            data = os.path.join(self.dir, "data")
            self._run("initdb", "-D", data, "-U", "flux", "-A", "trust", "-E", "UTF8", "--no-sync")
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            self._run("pg_ctl", "-D", data, "-l", os.path.join(self.dir, "server.log"), "-o", options, "-w", "start")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.url = f"postgres://flux@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run(self.prefix + [os.path.join(self.bin, tool), *args], capture_output=True, text=True, cwd=self.dir)
        if out.returncode != 0:
            pytest.fail(f"{tool} failed: {out.stdout}{out.stderr}")

    def stop(self) -> None:
        """Stops the server and removes its scratch folder (data, logs)."""
        try:
            self._run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster():
    """Two API nodes (`flux serve --role api`) and one `flux worker` on one PostgreSQL store;
    yields the API nodes' base URLs."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        message = "no PostgreSQL server binaries (install postgresql or set FLUX_PG_BIN)"
        if os.environ.get("FLUX_REQUIRE_POSTGRES") == "1" or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pg = _Postgres(bin_dir)
    logs, procs, bases = [], [], []
    try:
        store = ["--store", pg.url]
        for i in range(2):
            port = _free_port()
            log = open(os.path.join(pg.dir, f"api-{i}.log"), "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [_flux_binary(), "serve", "--role", "api", *store, "--addr", f"127.0.0.1:{port}", "--api-key", API_KEY],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
            _wait_healthy(procs[-1], bases[-1], log.name)
        log = open(os.path.join(pg.dir, "worker.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([_flux_binary(), "worker", *store], stdout=subprocess.DEVNULL, stderr=log))
        yield bases
    finally:
        _stop(procs)
        for log in logs:
            log.close()
        pg.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgres-api-0", "postgres-api-1"])
def server(request):
    """The base URL of a server: the single-machine one, or either API node of a two-node
    PostgreSQL setup."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_server")
    return request.getfixturevalue("postgres_cluster")[int(request.param[-1])]

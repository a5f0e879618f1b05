"""`nnc serve`: a real NVIDIA Triton Inference Server on a model repository from `nnc export-triton`.

Which server: the `tritonserver` binary that the `nvidia-pytriton` wheel ships (with Triton's
Python backend and its stubs for CPython 3.8-3.13; it needs glibc >= 2.35). pytriton pins numpy < 2
while nnc needs numpy 2, so the server and `tritonclient` live in their own virtual environment,
created on first use under $NNC_TRITON_VENV, else $XDG_CACHE_HOME/nnc/triton-venv-<pins> (or
~/.cache/...), with the versions pinned below. Nothing from that venv is imported into nnc's process.

The models' model.py runs nnc from nnc's environment: tritonserver's Python-backend stub embeds
libpython (the stub built for nnc's Python version is put into a backend directory next to the
venv), and an embedded interpreter finds its prefix by looking for `python3` on PATH, as pytriton
relies on too. So the server gets PATH with nnc's interpreter directory first (its venv's bin/:
pyvenv.cfg makes the stub's interpreter nnc's venv, numpy 2 and all), LD_LIBRARY_PATH with that
Python's libpython and the wheel's bundled libraries, and PYTHONPATH with nnc's sys.path.

The server listens on 127.0.0.1 only unless told otherwise; ports default to free ones; SIGTERM /
SIGINT stop it (it gets SIGTERM, then SIGKILL after a grace period).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .ir.errors import NncError

# tested together on CPython 3.11, glibc 2.36 (2026-12-02): tritonserver 2.5x from pytriton 0.7.0
PINS = ("nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0")
PIN_TAG = "pytriton0.7.0-tc2.73.0"


class ServeError(NncError):
    """The Triton environment or server could not be set up or started."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnc"


def venv_dir() -> Path:
    env = os.environ.get("NNC_TRITON_VENV")
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(env) if env else _cache_root() / f"triton-venv-{PIN_TAG}-{py}"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(_venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, timeout=60, check=True)
    return Path(out.stdout.strip())


@contextlib.contextmanager
def _venv_lock(venv: Path):
    """One process at a time creates or completes the venv (two first `nnc serve`s, two test runs)."""
    import fcntl
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_ready(venv: Path) -> bool:
    ready = venv / ".nnc-ready"
    return ready.is_file() and ready.read_text().strip() == "\n".join(PINS)


def ensure_venv(venv: Optional[Path] = None, *, log=None, timeout_s: float = 900) -> Path:
    """The Triton venv (created and pip-installed with PINS the first time; a `.nnc-ready` file
    marks a complete one, so an interrupted install is redone). Raises ServeError when it cannot
    be created (no network, pip failure), with pip's last lines."""
    venv = Path(venv) if venv is not None else venv_dir()
    if _is_ready(venv):
        return venv
    with _venv_lock(venv):
        if _is_ready(venv):  # another process made it while this one waited
            return venv
        return _create_venv(venv, log, timeout_s)


def _create_venv(venv: Path, log, timeout_s: float) -> Path:
    ready = venv / ".nnc-ready"
    if venv.exists() and any(venv.iterdir()):
        if not (venv / ".nnc-venv").is_file():  # never delete a directory nnc did not make
            raise ServeError(f"{venv}: exists and is not a Triton venv made by nnc; remove it or point "
                             f"$NNC_TRITON_VENV elsewhere")
        shutil.rmtree(venv)  # an interrupted install: redo it
    venv.parent.mkdir(parents=True, exist_ok=True)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    say = log or (lambda m: print(m, file=sys.stderr))
    say(f"nnc serve: creating the Triton venv {venv} ({', '.join(PINS)}); once")
    try:
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=300)
        (venv / ".nnc-venv").write_text("made by nnc serve (nnc/serve.py); safe to delete\n")
        r = subprocess.run([str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                            *PINS], capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.SubprocessError, OSError) as e:
        shutil.rmtree(venv, ignore_errors=True)
        raise ServeError(f"could not create the Triton venv {venv}: {e}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        shutil.rmtree(venv, ignore_errors=True)
        raise ServeError(f"pip could not install {' '.join(PINS)} into {venv} (no network?):\n{tail}")
    ready.write_text("\n".join(PINS))
    return venv


@dataclass(frozen=True)
class TritonDist:
    """Where the server's files are: the binary, the backend directory, the bundled libraries."""
    venv: Path
    binary: Path
    backends: Path
    libs: Path

    @property
    def python(self) -> Path:
        return _venv_python(self.venv)


def triton_dist(venv: Path) -> TritonDist:
    """The wheel's tritonserver, and a backend directory holding Triton's Python backend with the
    stub for nnc's Python version (what pytriton assembles per run; here once per venv)."""
    site = _site_packages(venv)
    root = site / "pytriton" / "tritonserver"
    binary, libs = root / "bin" / "tritonserver", site / "nvidia_pytriton.libs"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise ServeError(f"{venv}: no tritonserver binary or no Python-backend stub for Python {ver} in the "
                         f"nvidia-pytriton wheel ({binary}, {stub})")
    backends = venv / "nnc-backends"
    py = backends / "python"
    if not (py / "triton_python_backend_stub").is_file():
        with _venv_lock(venv):
            _make_backends(root, stub, venv, backends)
    return TritonDist(venv, binary, backends, libs)


def _make_backends(root: Path, stub: Path, venv: Path, backends: Path) -> None:
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        tmp = venv / "nnc-backends.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root / "backends", tmp)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(backends, ignore_errors=True)
        os.rename(tmp, backends)


def server_env(dist: TritonDist) -> dict:
    """tritonserver's environment: the stub's embedded Python must be nnc's (see the module docstring)."""
    env = dict(os.environ)
    exe_dir = str(Path(sys.executable).parent)  # nnc's venv bin/ (its python3 -> pyvenv.cfg -> site-packages)
    env["PATH"] = exe_dir + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env.pop("PYTHONHOME", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, so that a
    killed `nnc serve` or test run leaves no tritonserver behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerOptions:
    http_port: Optional[int] = None     # None: a free port
    grpc_port: Optional[int] = None
    metrics_port: Optional[int] = None
    host: str = "127.0.0.1"
    log_verbose: int = 0
    extra_args: Sequence[str] = field(default_factory=tuple)


class TritonServer:
    """A tritonserver process on REPO: start() returns once it is live (not necessarily every model
    ready: a model that fails to load is logged and left UNAVAILABLE, --exit-on-error=false), stop()
    sends SIGTERM then SIGKILL. Its log goes to `log_path`. Use as a context manager."""

    def __init__(self, repo, opts: ServerOptions = ServerOptions(), *, venv: Optional[Path] = None, log_path=None):
        self.repo = Path(repo).resolve()
        self.opts = opts
        self.venv = Path(venv) if venv is not None else None
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = Path(log_path) if log_path else None
        self._log_file = None
        self.http_port = opts.http_port or free_port(opts.host)
        self.grpc_port = opts.grpc_port or free_port(opts.host)
        self.metrics_port = opts.metrics_port or free_port(opts.host)

    @property
    def http_url(self) -> str:
        return f"{self.opts.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.opts.host}:{self.grpc_port}"

    def command(self, dist: TritonDist) -> list:
        o = self.opts
        return [str(dist.binary), f"--model-repository={self.repo}", f"--backend-directory={dist.backends}",
                f"--http-address={o.host}", f"--http-port={self.http_port}",
                f"--grpc-address={o.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={o.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--exit-on-error=false", "--strict-readiness=true",
                "--exit-timeout-secs=10", f"--log-verbose={o.log_verbose}", *o.extra_args]

    def start(self, timeout_s: float = 120) -> "TritonServer":
        if not self.repo.is_dir():
            raise ServeError(f"{self.repo}: no such model repository")
        venv = ensure_venv(self.venv)
        dist = triton_dist(venv)
        self.dist = dist
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="nnc-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(dist), env=server_env(dist), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise ServeError(f"tritonserver exited with status {self.proc.returncode} while starting; "
                                 f"its log ({self.log_path}):\n{self.log_tail()}")
            if self._get("/v2/health/live") == 200 and self._models_settled():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServeError(f"tritonserver did not come up within {timeout_s:.0f} s; its log:\n{self.log_tail()}")

    def _get(self, path: str) -> Optional[int]:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, ValueError):
            return None

    def repository_index(self, timeout: float = 2) -> list:
        """Triton's repository index: [{"name", "state", "reason"?, ...}] (raises OSError/ValueError)."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def _models_settled(self) -> bool:
        """Every model in the repository index is READY or UNAVAILABLE (load finished or failed)."""
        try:
            index = self.repository_index()
        except (OSError, ValueError):
            return False
        return all(m.get("state") in ("READY", "UNAVAILABLE") for m in index)

    def model_ready(self, name: str) -> bool:
        return self._get(f"/v2/models/{urllib.request.quote(name, safe='')}/ready") == 200

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait(self) -> int:
        return self.proc.wait() if self.proc else 0

    def stop(self, grace_s: float = 15) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the stubs go too
                self.proc.wait(timeout=10)
        # the Python-backend stubs are children in the server's session; none may outlive it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._close_log()
        return self.proc.returncode

    def _close_log(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def repository_for(paths: Sequence[str], tmp: Path, backend: str) -> Path:
    """REPO for `nnc serve`: a directory of models as given, or nnc OUT directories (plan.json)
    exported one by one into a temporary repository."""
    from .triton_export import TritonExportOptions, export_triton
    ps = [Path(p) for p in paths]
    if len(ps) == 1 and not (ps[0] / "plan.json").exists():
        return ps[0]
    for p in ps:
        if not (p / "plan.json").exists():
            raise ServeError(f"{p}: give one model repository, or nnc output directories (with plan.json)")
        export_triton(p, tmp, TritonExportOptions(backend=backend))
    return tmp


def serve(paths: Sequence[str], opts: ServerOptions, backend: str = "cuda") -> int:
    """Runs tritonserver in the foreground until SIGTERM/SIGINT or until it exits."""
    with tempfile.TemporaryDirectory(prefix="nnc-triton-repo-") as tmp:
        repo = repository_for(paths, Path(tmp), backend)
        server = TritonServer(repo, opts)
        stop = {"sig": None}

        def on_signal(sig, _frame):
            stop["sig"] = sig

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.start()
            print(f"nnc serve: Triton on {repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
                  f"metrics {opts.host}:{server.metrics_port}; log {server.log_path}", flush=True)
            for m in server.repository_index(timeout=5):
                print(f"  model {m.get('name')}: {m.get('state')} {m.get('reason', '')}".rstrip(), flush=True)
            while stop["sig"] is None and server.proc.poll() is None:
                time.sleep(0.2)
        finally:
            rc = server.stop()
            for s, h in old.items():
                signal.signal(s, h)
        if stop["sig"] is None and rc:
            print(f"nnc serve: tritonserver exited with status {rc}; log tail:\n{server.log_tail()}", file=sys.stderr)
            return 1
        return 0

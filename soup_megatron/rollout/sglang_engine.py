"""The rollout-engine protocol over SGLang servers (HTTP), for the on-policy and the history groups.

- generate: one `/generate` request per sample, `input_ids = prompt + prefix` (the prefix is
  prefilled, and shared prompt tokens come from the radix cache), `max_new_tokens` already reduced
  by the prefix length, every EOS id of the checkpoint as `stop_token_ids`, `return_logprob`;
  sampling seeded per request; with `routing_shape` (a MoE policy for routing replay) also
  `return_routed_experts`, each generation then carrying the experts SGLang routed every position to.
- score: `/generate` with `logprob_start_len`, reading `input_token_logprobs`.
- load_weights: `/update_weights_from_disk` with the step as `weight_version`, on every server of the
  group; only paths inside the run directory are sent (a server must never be told to load weights
  from elsewhere). A bad path is refused by SGLang, which keeps its old weights. A supervised server
  that is down (connection refused) is skipped: restarted, it gets these weights from the version check.
- Routing (`routing = prompt`): a group's requests (one prompt; its mixed samples' prefixes nest) go to one
  server, so its radix cache holds the prompt and the shared prefixes; groups are spread over the servers in
  turn. `least_loaded` sends each request to the server with the fewest in flight. At most
  `concurrency` requests are in flight per server; 0 (the default) sends all of a call's requests at
  once and leaves the limiting to SGLang's own admission (its KV pool and running-request cap). A timeout,
  refused connection or 5xx is retried (`retries`); a supervised server that died is restarted (by the
  run's watchdog or its serve process) and the request re-sent when it is healthy again; an external server that stops
  answering is dropped from rotation with a warning. Each result is stored by the request's index,
  so a retry can neither lose nor duplicate a sample. A server answering with another weight version
  than the group's (a restarted one) gets the group's weights again before it is used, once however many
  of its answers were stale; a request the server aborted is sent again.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import SGLangConfig
from ..log import get_logger
from .base import Generation, GenerationRequest, WeightSource
from .sglang_servers import ServerError, read_address_file

log = get_logger(__name__)

RELOAD_TRIES = 20  # updates of a restarted server's weights, 0.5 s apart, until SGLang flushes its cache
CACHE_NOT_FLUSHED = "cache was not flushed"  # in SGLang's answer to an update while a request still runs


def _update_answer(response) -> dict:
    """SGLang's answer to /update_weights_from_disk ({"success", "message"}), or a failed one for a body that is
    not JSON."""
    try:
        return response.json()
    except ValueError:
        return {"success": False, "message": f"HTTP {response.status_code}: {response.text[:200]}"}


def _finish_type(body: dict) -> str:
    reason = body["meta_info"]["finish_reason"]
    return reason["type"] if isinstance(reason, dict) else reason


class _Balancer:
    """Each routing key (a prompt) has a home server, keys taken in turn; a key whose home left rotation,
    and a request without a key, go to the server with the fewest in flight."""

    def __init__(self, urls: list[str], supervised: set[str], per_server: int, keys: Sequence[Optional[tuple]]):
        self.in_flight = {u: 0 for u in urls}
        self.supervised = supervised
        self.home: dict[tuple, str] = {}
        for key in keys:
            if key is not None and key not in self.home:
                self.home[key] = urls[len(self.home) % len(urls)]
        cap = per_server or max(1, len(keys))  # 0: no client-side cap
        self.slots = {u: asyncio.Semaphore(cap) for u in urls}
        # one reload at a time per server; the weight version each server was given during this call
        self.reloading = {u: asyncio.Lock() for u in urls}
        self.reloaded: dict[str, int] = {}

    def pick(self, key: Optional[tuple]) -> str:
        if not self.in_flight:
            raise ServerError("no SGLang server left in rotation (every external server stopped answering)")
        url = self.home.get(key)
        if url not in self.in_flight:
            url = min(self.in_flight, key=self.in_flight.get)
        self.in_flight[url] += 1
        return url

    def release(self, url: str) -> None:
        if url in self.in_flight:
            self.in_flight[url] -= 1

    def drop(self, url: str) -> None:
        log.warning(f"warning: SGLang server {url} stopped answering; dropped from rotation")
        self.in_flight.pop(url, None)


class SGLangEngine:
    def __init__(self, address_file: str | Path, cfg: SGLangConfig, allowed_root: str | Path, version: int = 0,
                 stop_ids: frozenset[int] = frozenset(), server: Optional[int] = None,
                 routing_shape: Optional[tuple[int, int]] = None):
        self.address_file = Path(address_file)
        self.server = server  # index of the one server this engine uses; None: all of the group
        self.stop_ids = sorted(stop_ids)  # every EOS id of the checkpoint (SGLang's own default may know fewer)
        self.cfg = cfg
        # (layers, k) of a MoE model whose routed experts the servers return (--enable-return-routed-experts)
        self.routing_shape = routing_shape
        self.allowed_root = Path(allowed_root).resolve()
        self.version = version  # the weights the servers were launched with, until load_weights
        self.weights_path: Optional[str] = None  # None: as launched (SGLang reports version "default")
        self.last_stats: dict[str, float] = {}  # input (prompt + prefix) and radix-cached tokens of the last generate

    # ---- plumbing ----------------------------------------------------------------------------------
    def _servers(self) -> tuple[list[str], set[str], dict[str, str]]:
        info = read_address_file(self.address_file)
        headers = {"Authorization": f"Bearer {info['api_key']}"} if info.get("api_key") else {}
        urls = info["urls"]
        if self.server is not None:
            if self.server >= len(urls):
                raise ServerError(f"{self.address_file} lists {len(urls)} servers; server {self.server} asked for")
            urls = [urls[self.server]]
        return urls, set(info.get("supervised", [])), headers

    def _run(self, path: str, payloads: list[dict], keys: Sequence[Optional[tuple]]) -> list[dict]:
        return asyncio.run(self._post_all(path, payloads, keys))

    async def _post_all(self, path: str, payloads: list[dict], keys: Sequence[Optional[tuple]]) -> list[dict]:
        import httpx

        urls, supervised, headers = self._servers()
        if self.cfg.routing == "least_loaded":
            keys = [None] * len(payloads)
        balancer = _Balancer(urls, supervised, self.cfg.concurrency, keys)
        limits = httpx.Limits(max_connections=(self.cfg.concurrency * len(urls)) or max(1, len(payloads)))
        async with httpx.AsyncClient(headers=headers, timeout=self.cfg.request_timeout, limits=limits) as client:
            # gather keeps the order: each result lands at its request's index, whatever retries happened
            return list(await asyncio.gather(*(self._post(client, balancer, path, payload, key)
                                               for payload, key in zip(payloads, keys))))

    async def _post(self, client, balancer: _Balancer, path: str, payload: dict, key: Optional[tuple]) -> dict:
        import httpx

        last_error = ""
        for attempt in range(self.cfg.retries + 1):
            url = balancer.pick(key)
            try:
                async with balancer.slots[url]:
                    response = await client.post(url + path, json=payload)
                if response.status_code in (401, 403):
                    raise ServerError(f"{url}{path} refused the request (HTTP {response.status_code}): "
                                      "the API key in the run's servers/ folder does not match the server's")
                if response.status_code >= 500:
                    last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                elif response.status_code >= 400:
                    raise ServerError(f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}")
                else:
                    body = response.json()
                    if path == "/generate" and _finish_type(body) == "abort":  # e.g. another client's abort_all
                        last_error = f"aborted by the server: {body['meta_info']['finish_reason']}"
                        continue
                    if path == "/generate" and not await self._version_ok(client, balancer, url, body):
                        last_error = "answered with stale weights (reloaded them)"
                        continue
                    return body
            except httpx.TransportError as exc:  # refused, reset, timed out
                last_error = f"{type(exc).__name__}: {exc}"
                balancer.reloaded.pop(url, None)  # restarted, it serves its launch weights again
                if url in balancer.supervised:
                    await self._wait_healthy(client, url)  # its watchdog or serve process restarts it
                elif len(balancer.in_flight) > 1:
                    balancer.drop(url)
            finally:
                balancer.release(url)
            await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0) * (0.5 + random.random()))
        raise ServerError(f"{path} failed after {self.cfg.retries + 1} attempts (rollout.sglang.retries="
                          f"{self.cfg.retries}); last error: {last_error}")

    async def _wait_healthy(self, client, url: str) -> None:
        import httpx

        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/health", timeout=2.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1.0)

    async def _version_ok(self, client, balancer: _Balancer, url: str, body: dict) -> bool:
        served = body.get("meta_info", {}).get("weight_version")
        if self.weights_path is None or served == str(self.version):  # None: never loaded, nothing to restore
            return True
        async with balancer.reloading[url]:  # the first stale answer reloads; the server's others just retry
            if balancer.reloaded.get(url) != self.version:
                await self._reload(client, url, served)
                balancer.reloaded[url] = self.version
        return False

    async def _reload(self, client, url: str, served: Optional[str]) -> None:
        """Give a server the group's weights while it serves others (restarted, it serves its launch weights).
        SGLang waits for the requests in flight, loads the weights, then flushes the radix cache; a request
        it has just finished may still count as running then, and it refuses the flush (the weights are
        loaded, their version not recorded): the update is sent again until the flush goes through."""
        for _ in range(RELOAD_TRIES):
            response = await client.post(url + "/update_weights_from_disk", json=self._update_payload())
            answer = _update_answer(response)
            if answer.get("success"):
                return
            if CACHE_NOT_FLUSHED not in str(answer.get("message", "")):
                break
            await asyncio.sleep(0.5)
        raise ServerError(f"{url}: serves weight version {served!r}, and reloading version {self.version} "
                          f"from {self.weights_path} failed: {response.text[:300]}")

    def _update_payload(self) -> dict:
        return {"model_path": self.weights_path, "weight_version": str(self.version)}

    # ---- the protocol ------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], temperature: float, seed: int) -> list[Generation]:
        payloads, keys, todo = [], [], []
        results: list[Generation] = [Generation([], [], "length", self.version) for _ in requests]
        for i, r in enumerate(requests):
            if r.max_new_tokens <= 0:
                continue
            todo.append(i)
            keys.append(tuple(r.prompt_ids))
            payloads.append({"input_ids": list(r.prompt_ids) + list(r.prefix_ids), "return_logprob": True,
                             "sampling_params": {"max_new_tokens": r.max_new_tokens, "temperature": temperature,
                                                 "stop_token_ids": self.stop_ids,
                                                 "sampling_seed": (seed * 1_000_003 + i) % 2**62},
                             **({"return_routed_experts": True} if self.routing_shape else {})})
        bodies = self._run("/generate", payloads, keys)
        cached = inputs = 0
        for i, body in zip(todo, bodies):
            meta = body["meta_info"]
            tokens = [int(t) for _, t, _ in meta["output_token_logprobs"]]
            results[i] = Generation(tokens, [float(lp) for lp, _, _ in meta["output_token_logprobs"]],
                                    "stop" if _finish_type(body) == "stop" else "length", self.version,
                                    self._routing(meta, len(payloads[todo.index(i)]["input_ids"]) + len(tokens) - 1))
            cached += meta.get("cached_tokens", 0)
            inputs += meta.get("prompt_tokens", 0)  # SGLang's name for all input tokens
        self.last_stats = {"cached_tokens": float(cached), "input_tokens": float(inputs)}
        return results

    def _routing(self, meta: dict, positions: int) -> Optional[torch.Tensor]:
        """The routed experts SGLang returned for a generation (base64 int32 [positions, layers, k]) as int16,
        or None when not asked for."""
        if self.routing_shape is None:
            return None
        if "routed_experts" not in meta:
            raise ServerError("the policy server returned no routed experts: it was not started with "
                              "--enable-return-routed-experts (actor.routing_replay=rollout starts it so)")
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        if flat.size != positions * self.routing_shape[0] * self.routing_shape[1]:
            raise ServerError(f"routed experts of {flat.size} entries for {positions} positions x "
                              f"{self.routing_shape[0]} layers x {self.routing_shape[1]} experts")
        return torch.from_numpy(flat.reshape(positions, *self.routing_shape).astype(np.int16))

    def score(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              temperature: float) -> list[list[float]]:
        payloads = [{"input_ids": list(c) + list(t), "return_logprob": True, "logprob_start_len": len(c) - 1,
                     "sampling_params": {"max_new_tokens": 1, "temperature": temperature}}
                    for c, t in zip(contexts, targets)]
        bodies = self._run("/generate", payloads, [None] * len(payloads))
        # entries start at the last context token (no log-prob of its own), then one per target token
        return [[float(lp) for lp, _, _ in body["meta_info"]["input_token_logprobs"][1:]][: len(t)]
                for body, t in zip(bodies, targets)]

    def check_weights_path(self, path: Path) -> Path:
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.allowed_root):
            raise ServerError(f"refusing to ask SGLang servers to load weights from {path}: only checkpoints inside "
                              f"the run directory {self.allowed_root} are allowed")
        if not (resolved / "config.json").is_file() or not any(resolved.glob("*.safetensors")):
            raise ServerError(f"{path}: not an HF checkpoint directory (needs config.json and *.safetensors)")
        return resolved

    def load_weights(self, source: WeightSource, version: int) -> None:
        import httpx

        if not isinstance(source, Path):
            raise ServerError("SGLang servers load weights from checkpoint directories; use rollout.weight_sync=disk")
        old = (self.weights_path, self.version)
        self.weights_path, self.version = str(self.check_weights_path(source)), version
        urls, supervised, headers = self._servers()
        try:
            bodies = asyncio.run(self._update_all(urls, supervised, headers))
        except BaseException as exc:
            self.weights_path, self.version = old
            if isinstance(exc, httpx.TransportError):  # e.g. SGLang's scheduler crashed on an unreadable file
                raise ServerError(f"loading {source} (version {version}): a server dropped the connection ({exc}); "
                                  "a supervised server is restarted and gets the previous weights again") from None
            raise
        failed = [f"{u}: {b}" for u, b in zip(urls, bodies) if not b.get("success")]
        if failed:
            self.weights_path, self.version = old
            raise ServerError(f"loading {source} (version {version}) failed, servers keep their weights: "
                              + "; ".join(failed))

    async def _update_all(self, urls: list[str], supervised: set[str], headers: dict[str, str]) -> list[dict]:
        import httpx

        async with httpx.AsyncClient(headers=headers, timeout=self.cfg.request_timeout) as client:
            async def one(url: str) -> dict:
                try:
                    response = await client.post(url + "/update_weights_from_disk", json=self._update_payload())
                except httpx.ConnectError:  # down before the request: not a load that crashed it
                    if url not in supervised:
                        raise
                    # restarted by its watchdog or serve task, it serves its launch weights and is given these
                    # (this version) by the version check before its first answer counts
                    log.warning(f"warning: SGLang server {url} is down; it loads version {self.version} when it is "
                                "back")
                    return {"success": True}
                if response.status_code in (401, 403):
                    raise ServerError(f"{url} refused the weight update (HTTP {response.status_code}): wrong API key")
                return _update_answer(response)

            return await asyncio.gather(*(one(u) for u in urls))

    def pause_generation(self) -> None:
        """Every server of the group stops running inference, in place: running requests keep their KV cache
        and continue where they stopped, new ones wait (a colocated history group during the rollout)."""
        self._control("/pause_generation", {"mode": "in_place"})

    def continue_generation(self) -> None:
        self._control("/continue_generation", {})

    def _control(self, path: str, payload: dict) -> None:
        import httpx

        urls, _, headers = self._servers()
        for url in urls:
            try:
                response = httpx.post(url + path, json=payload, headers=headers, timeout=self.cfg.request_timeout)
            except httpx.TransportError as exc:
                raise ServerError(f"{url}{path}: {type(exc).__name__}: {exc}") from None
            if response.status_code != 200:
                raise ServerError(f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}")

    def stats(self) -> dict[str, float]:
        return dict(self.last_stats)

    def close(self) -> None:
        pass  # the servers belong to the run's ServerGroup; connections close with each call

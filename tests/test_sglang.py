"""Real SGLang servers on CPU (the SGLang venv from tools/setup_sglang.sh): continuation log-probs,
weight updates, API keys, concurrency of the two groups, a server killed mid-rollout, cleanup."""

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from soup_megatron.config import RolloutConfig, SGLangConfig
from soup_megatron.metrics import read_metrics
from soup_megatron.model.hf import load_model, load_tokenizer
from soup_megatron.rollout import GenerationRequest, build_engine, sglang_servers
from soup_megatron.rollout.sglang_engine import SGLangEngine
from soup_megatron.rollout.sglang_servers import RolloutServers, ServerError, free_port, live_processes_in_group

from .conftest import ROOT, TINY
from .helpers import alive, child_pids, wait_until

SGLANG_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"


def sglang_config(**kw) -> SGLangConfig:
    if not SGLANG_PYTHON.is_file():
        pytest.fail(f"{SGLANG_PYTHON} is missing: run `bash tools/setup_sglang.sh` (tools/test.sh does)")
    return SGLangConfig(python=str(SGLANG_PYTHON), max_total_tokens=4096, request_timeout=60, **kw)


# the tests on the module's servers run on one pytest-xdist worker, so the servers start once
ON_MODULE_SERVERS = pytest.mark.xdist_group("tiny-sglang-servers")


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """The module's policy and history servers. The policy server's first port is taken by another process
    while it starts (SGLang binds it only after loading the model; a test worker's connection once took one
    in that window): the server must start again on another port."""
    run_dir = tmp_path_factory.mktemp("sglang-run")
    with socket.socket() as holder, pytest.MonkeyPatch.context() as patch:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        drawn = iter([holder.getsockname()[1]])
        patch.setattr(sglang_servers, "free_port", lambda host: next(drawn, None) or free_port(host))
        group = RolloutServers(sglang_config(), str(tiny_model), run_dir, ["policy", "history"]).start()
    yield run_dir, group
    group.close()


@ON_MODULE_SERVERS
def test_a_server_whose_port_was_taken_while_starting_starts_on_another(servers):
    run_dir, group = servers
    log = (run_dir / "servers" / "policy-0.log").read_text()
    taken = re.search(r"error while attempting to bind on address \('127.0.0.1', (\d+)\)", log)
    assert taken, "the policy server was meant to find its first port taken"
    url = json.loads((run_dir / "servers" / "policy.json").read_text())["urls"][0]
    assert url == group.groups["policy"].managed[0].url and not url.endswith(f":{taken.group(1)}")
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_servers_started_elsewhere_keep_their_addresses(tmp_path):
    """A group of external servers (rollout.sglang.policy_urls): the address file its clients read lists them,
    also once the group has waited for its servers (a CI run lost them there: the SmolLM2 SOUP run on servers
    started by the test module found no server to send to)."""
    key = tmp_path / "key"
    key.write_text("secret")
    key.chmod(0o600)
    cfg = sglang_config(policy_urls=["http://127.0.0.1:1", "http://127.0.0.1:2/"], api_key_file=str(key))
    group = sglang_servers.ServerGroup("policy", cfg, "unused", tmp_path)
    group.start()
    group.wait_healthy()
    listed = json.loads((tmp_path / "servers" / "policy.json").read_text())
    assert listed["urls"] == ["http://127.0.0.1:1", "http://127.0.0.1:2"] and listed["api_key"] == "secret"


def test_server_ports_are_free_and_below_the_ephemeral_range():
    ports = {free_port("127.0.0.1") for _ in range(20)}
    assert all(p < sglang_servers.ephemeral_low() for p in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def engine_for(run_dir, group="policy", **kw):
    return SGLangEngine(run_dir / "servers" / f"{group}.json", sglang_config(**kw), run_dir)


def prompts(tok, n):
    texts = [f"{a}+{a % 7 + 1}+{a % 5 + 2}=?\n" for a in range(1, n + 1)]
    return [tuple(tok.encode(t)) for t in texts]


@ON_MODULE_SERVERS
def test_continuation_logprobs_match_the_in_process_engine(servers, tiny_model):
    run_dir, _ = servers
    tok = load_tokenizer(tiny_model)
    engine = engine_for(run_dir)
    prefix = tuple(tok.encode("1+2=3\n"))
    reqs = [GenerationRequest(p, prefix if i % 2 else (), 20 - (len(prefix) if i % 2 else 0))
            for i, p in enumerate(prompts(tok, 8))]
    gens = engine.generate(reqs, 1.0, seed=3)
    local = build_engine(RolloutConfig(), tiny_model)
    contexts = [list(r.prompt_ids) + list(r.prefix_ids) for r in reqs]
    scored = local.score(contexts, [g.token_ids for g in gens], 1.0)
    for r, g, s in zip(reqs, gens, scored):
        assert 0 < len(g.token_ids) <= r.max_new_tokens and len(g.logprobs) == len(g.token_ids)
        assert g.finish_reason == ("stop" if g.token_ids[-1] == tok.eos_token_id else "length")
        assert max(abs(a - b) for a, b in zip(g.logprobs, s)) < 1e-4
    # scoring on the server agrees too, and prefix tokens came from the radix cache on a repeat
    server_scored = engine.score(contexts, [g.token_ids for g in gens], 1.0)
    for a, b in zip(server_scored, scored):
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    engine.generate(reqs, 1.0, seed=4)
    assert engine.last_stats["cached_tokens"] > 0
    # greedy equals the in-process engine's greedy
    greedy = [GenerationRequest(p, (), 12) for p in prompts(tok, 4)]
    served, in_process = engine.generate(greedy, 0.0, 0), local.generate(greedy, 0.0, 0)
    assert [g.token_ids for g in served] == [g.token_ids for g in in_process]


@ON_MODULE_SERVERS
def test_sglang_stops_at_every_eos_id_it_is_given(servers, tiny_model):
    """The checkpoint's EOS ids go to SGLang as stop_token_ids: with the newline among them a response
    ends at its first line, the stop token included, as the in-process engine ends it."""
    run_dir, _ = servers
    tok = load_tokenizer(tiny_model)
    newline = tok.encode("\n")[0]
    engine = SGLangEngine(run_dir / "servers" / "policy.json", sglang_config(), run_dir,
                          stop_ids=frozenset({tok.eos_token_id, newline}))
    gens = engine.generate([GenerationRequest(p, (), 20) for p in prompts(tok, 8)], 1.0, seed=5)
    assert any(g.token_ids[-1] == newline for g in gens)
    for g in gens:
        stops = [i for i, t in enumerate(g.token_ids) if t in (newline, tok.eos_token_id)]
        assert stops in ([], [len(g.token_ids) - 1]) and g.finish_reason == ("stop" if stops else "length")


def _perturbed_checkpoint(tiny_model, path: Path, scale: float) -> Path:
    model = load_model(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale) if not model.config.tie_word_embeddings else \
            model.model.embed_tokens.weight.mul_(scale)
    model.save_pretrained(path)
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, path / f.name)
    return path


@ON_MODULE_SERVERS
def test_weight_updates_change_outputs_and_version_and_bad_ones_change_nothing(servers, tiny_model):
    run_dir, _ = servers
    tok = load_tokenizer(tiny_model)
    engine = engine_for(run_dir, group="history")
    reqs = [GenerationRequest(p, (), 10) for p in prompts(tok, 4)]
    before = engine.generate(reqs, 1.0, seed=7)
    new = _perturbed_checkpoint(tiny_model, run_dir / "weights" / "v000005", 0.0)  # uniform next-token dist.
    engine.load_weights(new, 5)
    after = engine.generate(reqs, 1.0, seed=7)
    assert engine.version == 5 and all(g.version == 5 for g in after)
    vocab = len(tok)
    assert all(abs(lp + torch.log(torch.tensor(float(vocab))).item()) < 1e-3 for g in after for lp in g.logprobs)
    assert [g.logprobs for g in after] != [g.logprobs for g in before]

    # a path SGLang cannot load (sent past the client's checks): refused with 400, old weights kept
    info = json.loads((run_dir / "servers" / "history.json").read_text())
    r = httpx.post(info["urls"][0] + "/update_weights_from_disk", timeout=60,
                   json={"model_path": str(run_dir / "weights" / "missing"), "weight_version": "6"},
                   headers={"Authorization": f"Bearer {info['api_key']}"})
    assert r.status_code == 400 and not r.json()["success"]
    again = engine.generate(reqs, 1.0, seed=7)
    # still the uniform weights (sampled tokens themselves may differ: seeded sampling from a uniform
    # distribution is not reproducible across SGLang's batching, a CI run drew a different length)
    assert all(abs(lp + torch.log(torch.tensor(float(vocab))).item()) < 1e-3 for g in again for lp in g.logprobs)
    assert all(g.version == 5 for g in again)
    # the client checks a path before any request: a folder without weights, or one outside the run
    (run_dir / "weights" / "empty").mkdir()
    (run_dir / "weights" / "empty" / "config.json").write_text("{}")
    with pytest.raises(ServerError, match="needs config.json and"):
        engine.load_weights(run_dir / "weights" / "empty", 6)
    # a path outside the run directory never reaches a server
    with pytest.raises(ServerError, match="only checkpoints inside the run directory"):
        engine.load_weights(tiny_model, 7)
    engine.load_weights(_perturbed_checkpoint(tiny_model, run_dir / "weights" / "v000000", 1.0), 0)  # as before


@ON_MODULE_SERVERS
def test_api_key_is_required_and_never_shown(servers, tiny_model):
    run_dir, group = servers
    info = json.loads((run_dir / "servers" / "policy.json").read_text())
    url, key = info["urls"][0], info["api_key"]
    payload = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
    assert httpx.post(url + "/generate", json=payload, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(url + "/generate", json=payload, headers=wrong, timeout=30).status_code == 401
    weights = _perturbed_checkpoint(tiny_model, run_dir / "weights" / "v000099", 0.0)
    for headers in ({}, wrong):
        r = httpx.post(url + "/update_weights_from_disk", json={"model_path": str(weights), "weight_version": "99"},
                       headers=headers, timeout=60)
        assert r.status_code == 401
    ok = httpx.post(url + "/generate", json={**payload, "return_logprob": True},
                    headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["meta_info"]["weight_version"] == "default"  # unchanged
    # private files; the key in no process's command line and in no log
    assert (run_dir / "servers").stat().st_mode & 0o777 == 0o700
    assert (run_dir / "servers" / "policy.json").stat().st_mode & 0o777 == 0o600
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert "soup_sglang_launch.py" in ps, [line for line in ps.splitlines() if "python" in line or "sglang" in line]
    assert not [line for line in ps.splitlines() if key in line]
    logs = list(run_dir.rglob("*.log"))
    assert logs and all(key not in p.read_text(errors="replace") for p in logs)
    assert any("<api-key>" in p.read_text(errors="replace") for p in logs)  # SGLang printed it, redacted


@ON_MODULE_SERVERS
def test_policy_and_history_groups_serve_concurrently(servers, tiny_model):
    run_dir, _ = servers
    tok = load_tokenizer(tiny_model)
    reqs = [GenerationRequest(p, (), 16) for p in prompts(tok, 24)]
    out = {}
    threads = [threading.Thread(target=lambda g=g: out.__setitem__(g, engine_for(run_dir, g).generate(reqs, 1.0, 1)))
               for g in ("policy", "history")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(out[g]) == 24 and all(x.token_ids for x in out[g]) for g in ("policy", "history"))


@ON_MODULE_SERVERS
def test_external_server_that_stops_answering_is_dropped(servers, tiny_model, tmp_path, capsys):
    """Servers started elsewhere: one of two never answers; its requests go to the other, none lost."""
    run_dir, _ = servers
    info = json.loads((run_dir / "servers" / "policy.json").read_text())
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    address = tmp_path / "external.json"
    address.write_text(json.dumps({"urls": [dead, info["urls"][0]], "api_key": info["api_key"], "supervised": []}))
    engine = SGLangEngine(address, sglang_config(retries=2), tmp_path)
    tok = load_tokenizer(tiny_model)
    gens = engine.generate([GenerationRequest(p, (), 8) for p in prompts(tok, 16)], 1.0, 5)
    assert len(gens) == 16 and all(g.token_ids for g in gens)
    assert f"SGLang server {dead} stopped answering; dropped from rotation" in capsys.readouterr().err


@pytest.mark.slow  # 56 s: in the slow tier to keep the default under 15 min
def test_a_groups_requests_stay_on_one_server_and_hit_its_radix_cache(tiny_model, tmp_path):
    """Two policy servers: each prompt has a home server, so when a step's continuations follow its prompts,
    the prompt tokens come from that server's radix cache (spread over the two, half would miss)."""
    group = RolloutServers(sglang_config(policy_servers=2), str(tiny_model), tmp_path, ["policy"]).start()
    try:
        engine = engine_for(tmp_path)
        tok = load_tokenizer(tiny_model)
        group_prompts = [tuple(tok.encode(f"{a}+{a}+{a}+{a}+{a}=? routed\n")) for a in range(11, 17)]
        engine.generate([GenerationRequest(p, (), 1) for p in group_prompts], 1.0, 0)
        prefix = tuple(tok.encode("12"))
        requests = [GenerationRequest(p, prefix[: j % 3], 4) for p in group_prompts for j in range(4)]
        gens = engine.generate(requests, 1.0, 1)
        assert len(gens) == 24 and all(g.token_ids for g in gens)
        prompt_tokens = sum(len(p) for p in group_prompts) * 4
        routed = engine.last_stats["cached_tokens"]
        spread = SGLangEngine(tmp_path / "servers" / "policy.json", sglang_config(routing="least_loaded"), tmp_path)
        spread.generate(requests, 1.0, 2)
    finally:
        group.close()
    assert routed >= prompt_tokens - 24  # a last token may be recomputed
    assert spread.last_stats["cached_tokens"] < 0.8 * prompt_tokens  # requests spread over both: many miss


@ON_MODULE_SERVERS
def test_a_paused_history_server_holds_its_requests_and_loses_none(servers, tiny_model):
    """soup.history_placement=colocated pauses the history servers (in place) while the on-policy rollout
    runs: requests in flight and requests sent during the pause wait, then finish; the server saw each
    request once (no retry, nothing lost or sent twice).

    Work in flight by construction, not by timing: SGLang's /slow_down makes every forward pass sleep 0.1 s
    and log "Scheduler.run_batch sleep", so the test pauses once the server has begun the first requests'
    forward passes, long before 24 responses can be done, and sees from the same log line that no forward
    pass runs while it is paused."""
    run_dir, _ = servers
    tok = load_tokenizer(tiny_model)
    engine = engine_for(run_dir, "history")
    info = json.loads((run_dir / "servers" / "history.json").read_text())
    headers = {"Authorization": f"Bearer {info['api_key']}"}
    log = run_dir / "servers" / "history-0.log"
    reqs = [GenerationRequest(p, (), 64) for p in prompts(tok, 24)]
    results = {}

    def forwards() -> int:
        return log.read_text().count("Scheduler.run_batch sleep")

    def slow_down(seconds: float) -> None:  # 0 ends it
        r = httpx.post(info["urls"][0] + "/slow_down", json={"forward_sleep_time": seconds}, headers=headers,
                       timeout=30)
        assert r.status_code == 200, r.text

    sent_before, forwards_before = log.read_text().count("POST /generate"), forwards()
    slow_down(0.1)
    try:
        first = threading.Thread(target=lambda: results.setdefault("first", engine.generate(reqs, 1.0, 7)))
        first.start()
        assert wait_until(lambda: forwards() > forwards_before, poll=0.02), "no forward pass of the first requests"
        engine.pause_generation()
        try:
            assert first.is_alive(), "the generation finished before it could be paused"
            paused_at = forwards()
            second = threading.Thread(target=lambda: results.setdefault("second", engine.generate(reqs[:4], 1.0, 8)))
            second.start()
            time.sleep(2.0)  # twenty forward passes' time: a server that went on would have logged them
            assert forwards() <= paused_at + 1, "a paused server went on generating"  # the pass under way may end
            assert first.is_alive() and second.is_alive(), "a paused server answered"
        finally:
            engine.continue_generation()
    finally:
        slow_down(0)  # the module's server serves the other tests at full speed
    first.join(120)
    second.join(120)
    for gens in (results["first"], results["second"]):
        assert all(g.token_ids and len(g.token_ids) == len(g.logprobs) for g in gens)
        assert all(g.finish_reason == "stop" or len(g.token_ids) == 64 for g in gens)  # finished, not cut short
    assert len(results["first"]) == 24 and len(results["second"]) == 4
    # the access log line may lag the response a little
    wait_until(lambda: log.read_text().count("POST /generate") - sent_before >= 28, timeout=10)
    assert log.read_text().count("POST /generate") - sent_before == 28


def test_routing_gives_each_prompt_a_home_and_caps_in_flight_requests():
    from soup_megatron.rollout.sglang_engine import _Balancer

    keys = [(1,), (1,), (2,), (3,), (2,), None]
    balancer = _Balancer(["a", "b"], set(), 0, keys)
    assert balancer.home == {(1,): "a", (2,): "b", (3,): "a"}
    assert [balancer.pick(k) for k in keys[:5]] == ["a", "a", "b", "a", "b"]
    assert balancer.pick(None) == "b"  # fewest in flight (a: 3, b: 2)
    balancer.drop("a")
    assert balancer.pick((1,)) == "b"  # its home left rotation
    assert balancer.slots["b"]._value == len(keys)  # 0: no client-side cap
    assert _Balancer(["a", "b"], set(), 3, keys).slots["a"]._value == 3


def test_a_restarted_server_is_reloaded_once_and_again_until_it_flushes(tmp_path, monkeypatch):
    """SGLang answers that no run here produces on demand, played by an in-process transport (a three-node run
    met the second once, and died of it): eight stale answers at once (a restarted server) give one reload; an
    update refused with "cache was not flushed" (a request just finished still counted as running; the weights
    are loaded but their version is not recorded) is sent again; a request the server aborted is re-sent and
    not taken for a sample cut at its length."""
    served = {"version": "default", "updates": [], "aborted": set()}

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/update_weights_from_disk":
            served["updates"].append(body["weight_version"])
            if len(served["updates"]) == 2:  # the reload's first try
                return httpx.Response(400, json={"success": False, "message": "Weights were updated, but the cache "
                                                 "was not flushed because requests are still running or queued."})
            served["version"] = body["weight_version"]
            return httpx.Response(200, json={"success": True, "message": ""})
        token = body["input_ids"][0]
        finish = {"type": "stop"}
        if token == 3 and token not in served["aborted"] and served["version"] == "1":
            served["aborted"].add(token)
            finish = {"type": "abort", "message": "Abort in waiting queue"}
        return httpx.Response(200, json={"meta_info": {
            "weight_version": served["version"], "finish_reason": finish,
            "output_token_logprobs": [[-0.5, token, None]], "prompt_tokens": 1, "cached_tokens": 0}})

    transport = httpx.MockTransport(server)
    monkeypatch.setattr(httpx, "AsyncClient", functools.partial(httpx.AsyncClient, transport=transport))
    (tmp_path / "servers").mkdir()
    (tmp_path / "servers" / "policy.json").write_text(json.dumps({"urls": ["http://n3:1"], "api_key": "k",
                                                                   "supervised": ["http://n3:1"]}))
    weights = tmp_path / "weights" / "v000001"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"")
    engine = engine_for(tmp_path)
    engine.load_weights(weights, 1)
    served["version"] = "default"  # the server restarted with its launch weights
    gens = engine.generate([GenerationRequest((t,), (), 4) for t in range(8)], 1.0, 0)
    assert [g.token_ids for g in gens] == [[t] for t in range(8)] and all(g.finish_reason == "stop" for g in gens)
    assert served["updates"] == ["1", "1", "1"] and served["aborted"] == {3}


@ON_MODULE_SERVERS
def test_stand_in_kernels_were_never_called(servers):
    run_dir, _ = servers
    assert not (run_dir / "servers" / "sgl_kernel_calls.log").exists(), \
        (run_dir / "servers" / "sgl_kernel_calls.log").read_text()


@ON_MODULE_SERVERS
def test_cpu_servers_fork_their_scheduler_and_detokenizer(servers):
    """SGLang asked for its "spawn" start method and got "fork" (its children set their own process titles, so
    their command lines cannot tell): the launcher's note in each server's log."""
    run_dir, _ = servers
    for group in ("policy", "history"):
        log = (run_dir / "servers" / f"{group}-0.log").read_text()
        assert "SGLang's child processes are forked (it asked for 'spawn')" in log, log[-3000:]


def _listening_ports() -> str:
    return subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout


@pytest.mark.slow  # moved from the default tier to keep it under 15 min on 2 cores
def test_killed_server_is_restarted_and_no_sample_is_lost(tiny_model, tmp_path):
    """Killed mid-rollout: restarted, and every sample comes back once. Killed again and down when the group
    loads new weights: the update goes on without it, and it gets them before it serves."""
    group = RolloutServers(sglang_config(), str(tiny_model), tmp_path, ["policy"]).start()
    try:
        tok = load_tokenizer(tiny_model)
        engine = engine_for(tmp_path)
        server = group.groups["policy"].managed[0]
        reqs = [GenerationRequest(p, (), 48) for p in prompts(tok, 512)]
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("gens", engine.generate(reqs, 1.0, 2)))
        worker.start()
        deadline = time.time() + 120
        while time.time() < deadline and server.log_path.read_text().count("POST /generate") < 64:
            time.sleep(0.05)  # the first wave of requests has been answered; hundreds are still to come
        os.killpg(server.proc.pid, signal.SIGKILL)  # the whole server dies mid-rollout
        worker.join(600)
        assert not worker.is_alive()
        gens = result["gens"]
        assert len(gens) == 512 and all(g.token_ids and len(g.token_ids) == len(g.logprobs) for g in gens)
        assert group.restarts == 1 and server.alive()
        # down when the next weights are loaded: skipped, and given them before it answers again
        uniform = _perturbed_checkpoint(tiny_model, tmp_path / "weights" / "v000001", 0.0)
        os.killpg(server.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: f":{server.port} " not in _listening_ports(), timeout=30)
        engine.load_weights(uniform, 1)
        after = engine.generate(reqs[:4], 1.0, 3)
        uniform_logprob = -torch.log(torch.tensor(float(len(tok)))).item()
        assert group.restarts == 2 and all(abs(lp - uniform_logprob) < 1e-3 for g in after for lp in g.logprobs)
    finally:
        pid, port = server.proc.pid, server.port
        group.close()
    assert not live_processes_in_group(pid)
    assert f":{port} " not in _listening_ports()


def _sglang_overrides(tiny_model, out):
    return ["--config", "configs/tiny_cpu.yaml", *TINY, f"model.path={tiny_model}", f"trainer.out_dir={out}",
            "rollout.backend=sglang", f"rollout.sglang.python={SGLANG_PYTHON}", "rollout.sglang.max_total_tokens=4096"]


def _started_pids(out: Path) -> list[int]:
    return [pid for group in ("policy", "history") if (out / "servers" / f"{group}.json").is_file()
            for pid in json.loads((out / "servers" / f"{group}.json").read_text())["pids"]]


PLACEMENTS = {
    "dedicated": ["trainer.steps=3"],
    # two history servers beside two policy servers, paused during each rollout; a job covers two steps, and
    # the one for steps 2-3 (pool {v0, v1}) spreads its versions over both history servers
    "colocated": ["trainer.steps=4", "soup.history_placement=colocated", "rollout.sglang.policy_servers=2",
                  "rollout.sglang.history_servers=2", "soup.history_steps_per_call=2", "soup.lookahead=1"],
}


@pytest.mark.parametrize("placement", [pytest.param("dedicated"), pytest.param("colocated", marks=pytest.mark.slow)])
def test_soup_run_on_sglang_trains_syncs_and_cleans_up(tiny_model, tmp_path, placement):
    """`train` with rollout.backend=sglang: SOUP steps with prefixes from the history servers, disk weight
    sync, trainer/SGLang log-prob agreement; afterwards no server process or port is left."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "train", *_sglang_overrides(tiny_model, out),
                           "trainer.eval_interval=0", "history.interval=1", *PLACEMENTS[placement]],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    steps = 4 if placement == "colocated" else 3
    assert [r["step"] for r in rows] == list(range(steps + 1))
    if placement == "colocated":
        logs = [(out / "servers" / f"history-{i}.log").read_text() for i in range(2)]
        for log in logs:  # each history server paused and continued around every rollout, and generated
            assert log.count("POST /pause_generation") == steps and log.count("POST /continue_generation") > steps
            assert "POST /generate" in log
        loads = sum(r["history/weight_loads"] for r in rows[1:])
        assert 1 <= loads <= sum(log.count("POST /update_weights_from_disk") for log in logs)
    for r in rows[1:]:
        assert r["mix/mixed_samples"] > 0 and r["tokens/prefix"] > 0
        assert r["logp_gap/max"] < 1e-3, r  # SGLang's sampling log-probs = the trainer's recomputation
        assert r["tokens/input_tokens"] > 0 and "tokens/cached_tokens" in r
    assert sorted(p.name for p in (out / "weights").iterdir()) == [f"v{steps:06d}"]  # only the served export is kept
    assert out.stat().st_mode & 0o777 == 0o700
    pids = _started_pids(out)
    assert pids and not any(live_processes_in_group(pid) for pid in pids)
    info = json.loads((out / "servers" / "policy.json").read_text())
    assert not any(f":{u.rsplit(':', 1)[1]} " in _listening_ports() for u in info["urls"])


@pytest.mark.slow  # 67 s: moved to keep the default tier under 15 min on 2 cores
def test_sigterm_ends_every_process_the_run_started(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "soup_megatron.cli", "train", *_sglang_overrides(tiny_model, out),
                             "trainer.steps=200", "trainer.eval_interval=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the servers are up and the run has begun: step 0's evaluation is in metrics.jsonl
    assert wait_until(lambda: proc.poll() is not None or (out / "metrics.jsonl").is_file(), timeout=600)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    pids = _started_pids(out)
    assert pids and all(live_processes_in_group(pid) for pid in pids)
    # the prefix worker and the servers' launchers
    assert wait_until(lambda: len(child_pids(proc.pid)) >= 3, timeout=60), child_pids(proc.pid)
    children = child_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) != 0
    assert not any(live_processes_in_group(pid) for pid in pids)
    # multiprocessing's resource tracker leaves once it reads EOF from the run
    wait_until(lambda: not [pid for pid in children if alive(pid)], timeout=10)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in children if alive(pid)}
    assert not left, f"processes left running after SIGTERM: {left}"
    assert not [line for line in _listening_ports().splitlines()
                if any(f":{u.rsplit(':', 1)[1]} " in line for u in json.loads(
                    (out / "servers" / "policy.json").read_text())["urls"])]


@pytest.mark.slow  # moved from the default tier to keep it under 15 min on 2 cores
def test_servers_end_when_the_run_is_killed(tiny_model, tmp_path):
    """SIGKILL leaves no `finally` to run: the servers notice their owner is gone and end themselves."""
    script = (f"import sys, time; from pathlib import Path; from soup_megatron.config import SGLangConfig; "
              f"from soup_megatron.rollout.sglang_servers import RolloutServers; "
              f"RolloutServers(SGLangConfig(python={str(SGLANG_PYTHON)!r}, max_total_tokens=4096), "
              f"{str(tiny_model)!r}, Path({str(tmp_path)!r}), ['policy']).start(); "
              "print('up', flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "up"
    pids = _started_pids(tmp_path)
    assert pids and all(live_processes_in_group(pid) for pid in pids)
    owner.kill()
    owner.wait()
    assert wait_until(lambda: not any(live_processes_in_group(pid) for pid in pids), timeout=60)


def test_managed_servers_are_placed_on_their_own_gpus(tmp_path):
    """rollout.sglang.base_gpu_ids: policy servers take the first entries, history servers the rest
    (checked on the arguments; no GPU here to start them on)."""
    from soup_megatron.config import ConfigError, load_config
    from soup_megatron.rollout.sglang_servers import ServerGroup

    cfg = SGLangConfig(policy_servers=1, history_servers=2, base_gpu_ids=[4, 6, 7], device="cuda")
    policy = ServerGroup("policy", cfg, "model", tmp_path)
    history = ServerGroup("history", cfg, "model", tmp_path)
    placed = [s.args()[s.args().index("--base-gpu-id") + 1] for s in policy.managed + history.managed]
    assert placed == ["4", "6", "7"]
    assert "--base-gpu-id" not in ServerGroup("policy", SGLangConfig(), "model", tmp_path).managed[0].args()
    # colocated: history server i on policy server i's GPUs, each server with its own memory fraction
    cfg = SGLangConfig(policy_servers=2, history_servers=2, base_gpu_ids=[4, 6], device="cuda",
                       mem_fraction_static=0.5, history_mem_fraction_static=0.35)
    servers = [*ServerGroup("policy", cfg, "model", tmp_path, colocated=True).managed,
               *ServerGroup("history", cfg, "model", tmp_path, colocated=True).managed]
    assert [(s.args()[s.args().index("--base-gpu-id") + 1], s.args()[s.args().index("--mem-fraction-static") + 1])
            for s in servers] == [("4", "0.5"), ("6", "0.5"), ("4", "0.35"), ("6", "0.35")]
    from soup_megatron.rollout.serve import base_gpu

    run = load_config("configs/tiny_cpu.yaml", [
        "rollout.backend=sglang", "soup.history_placement=colocated", "rollout.sglang.device=cuda",
        "rollout.sglang.policy_servers=2", "rollout.sglang.history_servers=2", "rollout.sglang.base_gpu_ids=[4,6]",
        "rollout.sglang.mem_fraction_static=0.5", "rollout.sglang.history_mem_fraction_static=0.35"])
    assert [base_gpu(run, g, i, 0) for g in ("policy", "history") for i in range(2)] == [4, 6, 4, 6]
    with pytest.raises(ConfigError, match="one GPU index per managed server"):
        load_config("configs/tiny_cpu.yaml", ["rollout.sglang.base_gpu_ids=[4]", "rollout.sglang.history_servers=2"])


def test_an_api_key_starting_with_a_dash_reaches_sglang_intact():
    """Keys are secrets.token_urlsafe, so one in 64 starts with "-": passed as a separate word, argparse
    took it for an option and the server exited at start with its usage line (a flaky start in CI)."""
    if not SGLANG_PYTHON.is_file():
        pytest.fail(f"{SGLANG_PYTHON} is missing: run `bash tools/setup_sglang.sh` (tools/test.sh does)")
    shims = ROOT / "soup_megatron" / "rollout" / "sglang_pythonpath"
    check = ("from soup_sglang_launch import server_argv\n"
             "from sglang.srt.server_args import prepare_server_args\n"
             "import sys\n"
             "spec = {'args': ['--model-path', sys.argv[1], '--device', 'cpu'], 'api_key': '-Zk3_dash-first'}\n"
             "print(prepare_server_args(server_argv(spec)).api_key)\n")
    done = subprocess.run([str(SGLANG_PYTHON), "-c", check, str(ROOT / "configs")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(shims), "SOUP_SGLANG_SHIMS": "1",
                                            "SGLANG_USE_CPU_ENGINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "-Zk3_dash-first"


@pytest.mark.slow  # a server of its own, then a run with two (about 2.5 min)
def test_sglang_routes_as_the_trainer_and_a_soup_run_replays_its_routing(tiny_moe_model, tmp_path):
    """A MoE policy server started with --enable-return-routed-experts: its experts per position and layer
    (prompt, prefilled prefix and generated tokens) are the ones the trainer's routers choose on the same
    weights; the local actor replaying them scores SGLang's tokens with SGLang's log-probs, and replaying
    other experts does not. Then `train` with actor.routing_replay=rollout on SGLang: every scored position
    comes with the policy server's routing (the historical prefixes' too, prefilled by it)."""
    from soup_megatron.actor import build_actor
    from soup_megatron.actor.base import TokenBatch
    from soup_megatron.config import ActorConfig
    from soup_megatron.model.routing import RoutingTap
    from soup_megatron.sample import CONTINUATION

    group = RolloutServers(sglang_config(), str(tiny_moe_model), tmp_path, ["policy"], return_routing=True).start()
    try:
        engine = build_engine(RolloutConfig(backend="sglang", sglang=sglang_config()), tiny_moe_model, 0, tmp_path,
                              return_routing=True)
        tok = load_tokenizer(tiny_moe_model)
        requests = [GenerationRequest(tuple(tok.encode("3+4+5=?\n")), (), 16),
                    GenerationRequest(tuple(tok.encode("13+4+5+7=?\n")), tuple(tok.encode("13+4=")), 16)]
        generations = engine.generate(requests, 1.0, seed=5)
    finally:
        group.close()
    model = load_model(tiny_moe_model)
    tap = RoutingTap(model)
    rows = [[*r.prompt_ids, *r.prefix_ids, *g.token_ids] for r, g in zip(requests, generations)]
    for row, generation in zip(rows, generations):
        with torch.no_grad():
            model(input_ids=torch.tensor([row]))
        assert torch.equal(generation.routing, tap.take(1, len(row))[0, :-1])
    tap.close()
    # the local actor replays SGLang's routing over the two samples
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    segment = torch.zeros(2, width - 1, dtype=torch.long)
    routing = torch.full((2, width - 1, 2, 2), -1, dtype=torch.int16)
    for i, (r, g) in enumerate(zip(requests, generations)):
        start = len(r.prompt_ids) + len(r.prefix_ids) - 1
        segment[i, start: start + len(g.token_ids)] = CONTINUATION
        routing[i, : len(rows[i]) - 1] = g.routing
    actor = build_actor(ActorConfig(routing_replay="rollout"), tiny_moe_model)
    batch = TokenBatch(ids, mask, segment, torch.zeros(2, width - 1), torch.zeros(2, width - 1), torch.zeros(2),
                       routing=routing)
    replayed = actor.logprobs(batch, 1.0)[0]
    batch.routing = (routing + 1) % 4
    moved = actor.logprobs(batch, 1.0)[0]
    ours = torch.cat([replayed[i][segment[i] == CONTINUATION] for i in range(2)])
    theirs = torch.tensor([lp for g in generations for lp in g.logprobs])
    assert (ours - theirs).abs().max() < 1e-5
    # and the megatron actor with the experts over two expert-parallel ranks, replaying the same routing
    batch.routing = routing
    torch.save({f: getattr(batch, f) for f in ("input_ids", "attention_mask", "segment", "behaviour_logp",
                                               "versions", "advantages", "routing")}, tmp_path / "batch.pt")
    from .test_megatron import run as run_ranks

    run_ranks("tests/mcore_ranks.py", "replayed", tiny_moe_model, "--tp", 1, "--ep", 2,
              "--batch", tmp_path / "batch.pt", "--out", tmp_path / "megatron.json", ranks=2)
    megatron = torch.tensor(json.loads((tmp_path / "megatron.json").read_text())["logp"])
    assert (torch.cat([megatron[i][segment[i] == CONTINUATION] for i in range(2)]) - theirs).abs().max() < 1e-5
    assert (torch.cat([moved[i][segment[i] == CONTINUATION] for i in range(2)]) - theirs).abs().max() > 1e-3
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "soup_megatron.cli", "train", *_sglang_overrides(tiny_moe_model, out),
                           "model.tiny.num_experts=4", "model.tiny.num_kv_heads=2", "actor.routing_replay=rollout",
                           "trainer.eval_interval=0", "history.interval=1", "trainer.steps=3"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    for r in trained:
        assert r["moe/routing_given_share"] == 1.0 and r["moe/routing_disagreement"] < 0.01
        assert r["logp_gap/max"] < 1e-4
    assert any("moe/routing_disagreement/prefix" in r for r in trained)
    assert "--enable-return-routed-experts" in (out / "servers" / "policy-0.args.json").read_text()

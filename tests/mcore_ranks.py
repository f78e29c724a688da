"""Checks that need several megatron ranks; run by tests/test_megatron.py under torchrun.

    torchrun --nproc-per-node N tests/mcore_ranks.py logits --tp T --out result.json MODEL_DIR...
    torchrun --nproc-per-node N tests/mcore_ranks.py actor --tp T [--pp P] [--vp V] [--cp C] [--sp] \\
        --out result.json --work DIR TINY_MODEL
    torchrun --nproc-per-node N tests/mcore_ranks.py actors --layouts LAYOUTS.json --out results.json --work DIR
    torchrun --nproc-per-node N tests/mcore_ranks.py replayed --tp T --ep E --batch BATCH.pt --out logp.json MOE_MODEL

Rank 0 writes the measured differences as JSON; the test asserts on them. `actors` runs `actor` for each
layout of a JSON object {id: actor_parity's arguments} in turn, in one launch (each rank imports torch and
megatron once: about 12 s a process here), and writes {id: differences}.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soup_megatron.actor import build_actor  # noqa: E402
from soup_megatron.actor.base import TokenBatch  # noqa: E402
from soup_megatron.algo.loss import LossConfig, LossScale, advantage_weights  # noqa: E402
from soup_megatron.algo.rollout_correction import rollout_correction  # noqa: E402
from soup_megatron.algo.stats import segment_stats  # noqa: E402
from soup_megatron.config import ActorConfig, MegatronConfig  # noqa: E402
from soup_megatron.model.hf import fuse_experts  # noqa: E402
from soup_megatron.sample import CONTINUATION, PREFIX, PROMPT  # noqa: E402


def logits_differences(model_dirs: list[str], tp: int) -> dict:
    """Max |megatron - HF| over all logits (vocabulary gathered here only to compare), per model."""
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from soup_megatron.mcore import checkpoint, parallel
    from soup_megatron.mcore.cpu_compat import cuda_on_cpu
    from soup_megatron.mcore.model import build_gpt_model, padded_vocab_size, read_architecture
    from soup_megatron.mcore.weights import chunk_params

    # megatron-core runs MoE layers under tensor parallelism only with sequence parallelism (the sequence, 22
    # positions, splits over the ranks between layers)
    mc = MegatronConfig(tensor_parallel=tp, sequence_parallel=tp > 1)
    layout = parallel.initialize(mc)
    out = {}
    for d in model_dirs:
        arch = read_architecture(Path(d))
        model = build_gpt_model(arch, mc)
        checkpoint.load_hf_into([model], [chunk_params(arch, range(arch.num_layers), True, True, False)], arch,
                                Path(d), layout, padded_vocab_size(arch.vocab_size, mc))
        device = next(model.parameters()).device  # a GPU where there is one (tests/test_gpu.py)
        ids = torch.randint(0, arch.vocab_size, (3, 22), generator=torch.Generator().manual_seed(0)).to(device)
        positions = torch.arange(22, device=device)[None].expand(3, -1)
        with torch.no_grad(), cuda_on_cpu():  # a MoE router asks for the current device
            local = model(input_ids=ids, position_ids=positions, attention_mask=None)
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
            ours = torch.cat(parts, -1)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
            theirs = hf(input_ids=ids).logits
        out[Path(d).name] = {"max_abs_diff": float((ours[..., : arch.vocab_size] - theirs).abs().max()),
                             "padding_columns": ours.shape[-1] - arch.vocab_size}
    return out


def soup_batch(vocab: int, n: int = 8, width: int = 30) -> TokenBatch:
    """Prompt | historical prefix | on-policy continuation rows of different lengths, with advantages of
    both signs and behaviour log-probs away from the current policy (so ratios and clipping matter)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (n, width), generator=g)
    mask = torch.ones(n, width, dtype=torch.long)
    segment = torch.full((n, width - 1), PROMPT)
    for i in range(n):
        length = width - 2 * i
        mask[i, length:] = 0
        ids[i, length:] = 0
        prefix_end = 6 + (i % 3) * 3 if i % 2 else 5  # odd rows are mixed, even rows on-policy
        segment[i, 4: prefix_end] = PREFIX
        segment[i, prefix_end: length - 1] = CONTINUATION
    versions = torch.where(segment == PROMPT, -1, 0)
    advantages = torch.linspace(-1.5, 1.5, n)
    return TokenBatch(ids, mask, segment, torch.zeros(n, width - 1), versions, advantages)


def _exported(mega, tensors_of=lambda p: p) -> dict:
    """HF-named full tensors of the megatron actor's parameters (or of what `tensors_of` gives per
    parameter, e.g. its gradient), gathered from the tensor-parallel ranks. Collective."""
    from soup_megatron.mcore import checkpoint

    saved = {}
    for p in (p for chunk in mega.chunks for p in chunk.parameters()):
        saved[p] = p.data
        p.data = tensors_of(p).detach()
    try:
        return dict(checkpoint.iter_hf_tensors(mega.chunks, mega.params, mega.arch, mega.layout))
    finally:
        for p, data in saved.items():
            p.data = data


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def actor_parity(model_dir: str, work: Path, tp: int = 1, pp: int = 1, vp: int = 1, cp: int = 1, sp: bool = False,
                 max_tokens: int = 0, ep: int = 1, replay: bool = False) -> dict:
    """One SOUP update on the megatron actor (TP=tp, with sequence parallelism if sp, x PP=pp with vp model
    chunks per stage x CP=cp, the rest data parallel, a MoE model's experts over EP=ep of those; micro-batches
    by a token budget when max_tokens > 0; with `replay` both replay one routing, the local router's own
    choice with the experts of every other position moved and every fourth position left free)
    vs the local actor (micro-batches of 3 rows), with a TIS rollout correction on the continuation. Every
    rank calls the actor's per-rank methods directly (SPMD), so gradients can be compared too."""
    megatron = MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vp, context_parallel=cp,
                              sequence_parallel=sp, expert_parallel=ep)
    acfg = ActorConfig(lr=1e-3, grad_clip=0.3, micro_batch_size=3, megatron=megatron,
                       routing_replay="rollout" if replay else "none")
    loss_cfg = LossConfig(prefix_mode="clip", loss_agg="token_mean", entropy_coef=0.01)
    mega_cfg = ActorConfig(**{**acfg.__dict__, "backend": "megatron", "max_tokens_per_micro_batch": max_tokens})
    mega = build_actor(mega_cfg, model_dir, samples_per_update=8)
    local = build_actor(acfg, model_dir)
    batch = soup_batch(local.model.config.vocab_size)
    replayed = {}
    if replay:
        natural_logp, _, natural = local.logprobs(batch, 0.8, with_routing=True)
        given = natural.clone()
        given[:, ::2] = (given[:, ::2] + 1) % local.model.config.num_experts
        given[:, 1::4] = -1
        batch.routing = given
    logp_local, ent_local = local.logprobs(batch, 0.8, with_entropy=True)[:2]
    if replay:
        logp_mega, ent_mega, routed_mega = mega._logprobs(mega.own_rows(batch), 0.8, True, True)
        routed_local = local.logprobs(batch, 0.8, with_routing=True)[2]
        real_positions = batch.attention_mask[:, 1:] > 0
        replayed = {"replay_moved_logp": float((logp_local - natural_logp)[batch.segment != PROMPT].abs().max()),
                    "routing_differs_at": int((routed_mega != routed_local)[real_positions].any(-1).any(-1).sum())
                    if dist.get_rank() == 0 else 0}
    else:
        logp_mega, ent_mega = mega._logprobs(mega.own_rows(batch), 0.8, True)
    real = batch.segment != PROMPT
    batch.old_logp = logp_local
    batch.behaviour_logp = logp_local + 0.3 * torch.randn(logp_local.shape, generator=torch.Generator().manual_seed(3))
    batch.correction = rollout_correction(batch.old_logp, batch.behaviour_logp, batch.segment, "tis", "token", 1.2)
    before = local.rollout_weights()
    scale = LossScale.of(batch.segment, loss_cfg.prefix_mode)
    out_local = local.train_minibatch(batch, loss_cfg, 0.8)
    out_mega = mega._train_minibatch(mega.own_rows(batch), loss_cfg, 0.8, scale)
    grads_local = {n: p.grad for n, p in local.model.named_parameters()}
    # megatron's DDP keeps gradients in fp32 buffers (main_grad); with a sharded optimizer each rank
    # holds the reduced sum of its own shard only, so gradients are compared when nothing is sharded
    grads_mega = _exported(mega, lambda p: p.main_grad) if not mega.sharded_optimizer else None
    after_local = local.rollout_weights()
    after_mega = _exported(mega)
    advantage_weight = advantage_weights(batch.advantages, batch.segment, loss_cfg, scale).flatten()
    stats_local, stats_mega = (segment_stats(batch.segment.flatten(), o["ratio"], o["clipped"], o["ratio_out"],
                                             o["entropy"], advantage_weight) for o in (out_local, out_mega))
    # save / resume: the next update from the saved state is the same as the one made without saving
    mega._save_state(work / "state", 1)
    second = mega._train_minibatch(mega.own_rows(batch), loss_cfg, 0.8, scale)
    weights_second = _exported(mega)
    mega._load_state(work / "state")
    again = mega._train_minibatch(mega.own_rows(batch), loss_cfg, 0.8, scale)
    weights_again = _exported(mega)
    # and so does a new actor, as a resumed job makes: its optimizer has taken no step yet
    fresh = build_actor(mega_cfg, model_dir, samples_per_update=8)
    fresh._load_state(work / "state")
    from_fresh = fresh._train_minibatch(fresh.own_rows(batch), loss_cfg, 0.8, scale)
    weights_fresh = _exported(fresh)
    if dist.get_rank() != 0:
        return {}
    # the megatron actor exports a MoE layer's experts one tensor each, as checkpoints store them; the local
    # (transformers) model holds them fused
    grads_mega, after_mega, weights_second, weights_again, weights_fresh = (
        None if d is None else fuse_experts(d, after_local)
        for d in (grads_mega, after_mega, weights_second, weights_again, weights_fresh))
    update_local = {k: after_local[k] - before[k] for k in after_mega}
    update_mega = {k: after_mega[k] - before[k] for k in after_mega}
    # Adam's first update is lr * g / (|g| + eps): where |g| is near eps (1e-8) it turns fp32 rounding of g
    # into a visible change, so the update is compared where the gradient is well above eps
    clear = {k: grads_local[k].abs() > 1e-6 for k in update_mega}
    update_gap = max(float((update_local[k] - update_mega[k])[clear[k]].abs().max()) for k in update_mega)
    return {
        **replayed,
        "expert_load_max": [out.get("moe/expert_load_max") for out in (out_local, out_mega)],
        "sequence_parallel": mega.chunks[0].config.sequence_parallel,
        "micro_batch_rows": [len(rows) for rows, _ in mega._micro_batches(mega.own_rows(batch))],
        "corrected_tokens": int((batch.correction[real] < 1).sum()),
        "logp_diff": float((logp_local - logp_mega)[real].abs().max()),
        "entropy_diff": float((ent_local - ent_mega)[real].abs().max()),
        "loss_local": out_local["loss"], "loss_megatron": out_mega["loss"],
        "grad_norm_local": out_local["grad_norm"], "grad_norm_megatron": out_mega["grad_norm"],
        "grad_clip": acfg.grad_clip,
        "grad_max_rel_diff": _max_rel(grads_mega, grads_local) if grads_mega is not None else None,
        "update_max_diff_where_grad_above_1e-6": update_gap,
        "update_max": max(float(u.abs().max()) for u in update_local.values()),
        "share_of_entries_compared": float(sum(c.sum() for c in clear.values())
                                           / sum(c.numel() for c in clear.values())),
        "segment_stats_diff": max(abs(stats_local[k] - stats_mega[k]) for k in stats_local),
        "segment_stats_keys_match": sorted(stats_local) == sorted(stats_mega),
        "resume_loss": [second["loss"], again["loss"], from_fresh["loss"]],
        "resume_weight_diff": max(float((weights_second[k] - w[k]).abs().max()) for w in (weights_again, weights_fresh)
                                  for k in w),
        # the local state dict also lists a tied lm_head, which HF checkpoints leave out
        "names_only_local": sorted(set(after_local) - set(after_mega)),
        "names_only_megatron": sorted(set(after_mega) - set(after_local)),
    }


def replayed_logprobs(model_dir: str, tp: int, ep: int, batch_file: Path) -> dict:
    """The megatron actor's log-probs of a saved TokenBatch (torch.save of its fields), replaying its routing."""
    batch = TokenBatch(**torch.load(batch_file))
    megatron = MegatronConfig(tensor_parallel=tp, expert_parallel=ep, sequence_parallel=tp > 1)
    mega = build_actor(ActorConfig(backend="megatron", megatron=megatron, routing_replay="rollout"), model_dir)
    logp, _ = mega._logprobs(mega.own_rows(batch), 1.0, False)
    return {"logp": logp.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=["logits", "actor", "actors", "replayed"])
    parser.add_argument("--batch", type=Path, help="a saved TokenBatch (replayed)")
    parser.add_argument("--layouts", type=Path, help="a JSON object {id: actor_parity's arguments} (actors)")
    parser.add_argument("models", nargs="*")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (with tp > 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallelism (a MoE model)")
    parser.add_argument("--replay", action="store_true", help="both actors replay one given routing (a MoE model)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--max-tokens", type=int, default=0, help="the megatron actor's token budget per micro-batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.check == "logits":
        result = logits_differences(args.models, args.tp)
    elif args.check == "replayed":
        result = replayed_logprobs(args.models[0], args.tp, args.ep, args.batch)
    elif args.check == "actors":
        result = {}
        for layout_id, layout in json.loads(args.layouts.read_text()).items():
            print(f"layout {layout_id}", flush=True)  # names the layout a failure's traceback follows
            torch.manual_seed(0)
            (args.work / layout_id).mkdir(parents=True, exist_ok=True)
            result[layout_id] = actor_parity(**layout, work=args.work / layout_id)
    else:
        result = actor_parity(args.models[0], args.work, args.tp, args.pp, args.vp, args.cp, args.sp, args.max_tokens,
                              args.ep, args.replay)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

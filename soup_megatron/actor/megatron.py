"""megatron-core actor: the policy split over tensor-, pipeline-, context- and data-parallel ranks.

The processes come from the launcher (torchrun / srun). Global rank 0 is the driver: it runs the
trainer loop and calls the actor like any other; each call goes to the other ranks as a typed command
with only their rows of the batch (`megatron_commands.py`), and they sit in `follow()` and run it.
Data-parallel ranks take every dp-th sample; context-parallel ranks of a replica share its samples
and each computes two chunks of every sequence. The microbatches go through megatron's forward/backward
schedule (1F1B across pipeline stages; interleaved 1F1B over several model chunks per stage with
`virtual_pipeline`). The SOUP loss
weights use the whole batch's token counts, so summing gradients over ranks and microbatches gives
exactly the gradient of the batch loss: megatron's DDP sums (not averages) them into fp32 gradient
buffers when the loss is per token, and megatron's optimizer (fp32 main weights, Adam, grad-norm
clipping; sharded over data x context-parallel ranks with `distributed_optimizer`) takes the step.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..algo.loss import LossConfig, LossScale, aggregation_weights, loss_mask, soup_loss
from ..config import ActorConfig, MegatronConfig
from ..mcore import checkpoint, cpu_compat, parallel
from ..mcore.logprobs import vocab_parallel_logprobs
from ..mcore.model import Architecture, padded_vocab_size, read_architecture
from ..mcore.routing_replay import MegatronRouting
from ..mcore.weights import build_chunks, mark_tensor_parallel
from ..model.hf import CheckpointError
from ..model.routing import load_max
from .base import PER_TOKEN_STATS, TokenBatch, padding_share, per_token_stats, plan_micro_batches
from .megatron_commands import (
    Close,
    Command,
    CommandChannel,
    LoadState,
    LogProbs,
    RankRows,
    RolloutWeights,
    SaveHF,
    SaveState,
    TrainMinibatch,
)


def check_layout(mc: MegatronConfig, world: int) -> None:
    """Refuse, before any process group starts, layouts this actor cannot run on `world` processes."""
    shards = world // (mc.tensor_parallel * mc.pipeline_parallel)  # data x context parallel
    if mc.distributed_optimizer and mc.tensor_parallel > 1 and mc.pipeline_parallel > 1 and shards > 1:
        raise parallel.ParallelError(
            f"actor.megatron.distributed_optimizer=true with tensor_parallel > 1 and pipeline_parallel > 1 and "
            f"{shards} data x context-parallel ranks to shard over: "
            "megatron-core 0.16's checkpoint of the distributed optimizer fails in that layout (its "
            "dp_reshardable format mixes up the buckets of the stages; the layout-free format fails with "
            "torch's Adam), so training could not be saved; set distributed_optimizer=false (each rank then "
            "keeps the full fp32 main weights and Adam state: tools/plan_memory.py shows whether that fits)")


class MegatronActor:
    def __init__(self, model_path: str | Path, cfg: ActorConfig, samples_per_update: int | None = None):
        mc = cfg.megatron
        self.cfg = cfg
        self.model_path = Path(model_path)
        self.arch = read_architecture(self.model_path)
        check_layout(mc, parallel.world_size())
        self.layout = parallel.initialize(mc)
        self.places = parallel.rank_places(self.layout)
        if samples_per_update is not None:
            parallel.check_batch_split(samples_per_update, self.layout)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        # one per virtual pipeline stage; a MoE model's routers report their choices (the experts' load, the
        # routing a log-prob pass returns) and replay given ones
        moe = self.arch.is_moe
        self.chunks, self.params = build_chunks(self.arch, mc, self.layout, cfg.moe, routing_replay=moe)
        self.routing = (MegatronRouting(self.chunks, self.layout, self.chunks[0].config.sequence_parallel,
                                        self.arch.moe_top_k) if moe else None)
        for chunk, params in zip(self.chunks, self.params):
            mark_tensor_parallel(chunk, params)
        self.padded_vocab = padded_vocab_size(self.arch.vocab_size, mc)
        self.vocab_start = self.layout.tp_rank * self.padded_vocab // self.layout.tp
        if mc.checkpoint:
            saved = checkpoint.read_metadata(Path(mc.checkpoint)).get("architecture")
            if saved is None or asdict(Architecture(**saved)) != asdict(self.arch):
                raise CheckpointError(f"actor.megatron.checkpoint={mc.checkpoint} was converted from another model "
                                      f"than model.path={model_path} (architectures differ)")
            checkpoint.load_distributed(Path(mc.checkpoint), self.chunks, None, self.layout)
        else:
            checkpoint.load_hf_into(self.chunks, self.params, self.arch, self.model_path, self.layout,
                                    self.padded_vocab, progress=self.layout.is_driver)
        # megatron shards over the data- and context-parallel ranks; with one of them there is nothing to shard
        self.sharded_optimizer = mc.distributed_optimizer and self.layout.dp * self.layout.cp > 1
        self.ddp, self.optimizer = self._wrap_for_training()
        self.channel = CommandChannel(self.layout.dp_rank, self.layout.dp, self.device)
        self.version = 0
        self.closed = False

    def _wrap_for_training(self):
        """megatron's DDP around each model chunk (gradient buffers, reduction over data-parallel ranks) and
        its optimizer over all of them, made after the weights are loaded: the optimizer copies them into
        its fp32 main weights."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        mc = self.cfg.megatron
        sharded = self.sharded_optimizer
        config = self.chunks[0].config
        with cpu_compat.cuda_on_cpu():
            ddp = [DistributedDataParallel(config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=sharded), chunk) for chunk in self.chunks]
            optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, clip_grad=self.cfg.grad_clip,
                bf16=mc.params_dtype == "bfloat16", params_dtype=config.params_dtype,
                use_distributed_optimizer=sharded), ddp)
        return ddp, optimizer

    # ---- driver -> followers ---------------------------------------------------------------------
    def _execute(self, command: Command, rows: Optional[RankRows]):
        """Run `command` on this rank (with this data-parallel rank's `rows` of its batch)."""
        if isinstance(command, LogProbs):
            return self._logprobs(rows, command.temperature, command.with_entropy, command.with_routing)
        if isinstance(command, TrainMinibatch):
            return self._train_minibatch(rows, command.loss_cfg, command.temperature, command.scale)
        if isinstance(command, RolloutWeights):
            return self._rollout_weights()
        if isinstance(command, SaveHF):
            return self._save_hf(command.path)
        if isinstance(command, SaveState):
            return self._save_state(command.path, command.version)
        if isinstance(command, LoadState):
            return self._load_state(command.path)
        raise TypeError(f"not a megatron actor command: {command!r}")

    def _run(self, command: Command, batch: Optional[TokenBatch] = None):
        """On the driver: send `command` (and each rank its rows of `batch`), then run it here too."""
        return self._execute(command, self.channel.send(command, batch))

    def follow(self) -> None:
        """Non-driver ranks: run the driver's commands until it closes the actor."""
        while True:
            command, rows = self.channel.receive()
            if isinstance(command, Close):
                return
            self._execute(command, rows)

    def close(self) -> None:
        if self.layout.is_driver and self.layout.world > 1 and not self.closed:
            self.channel.send(Close())
        self.closed = True

    def own_rows(self, batch: TokenBatch) -> RankRows:
        """This rank's rows of `batch` (for callers that run the per-rank methods on every rank themselves)."""
        return RankRows.of(batch, self.layout.dp_rank, self.layout.dp)

    # ---- the actor protocol (driver side) ----------------------------------------------------------
    def logprobs(self, batch: TokenBatch, temperature: float, with_entropy: bool = False, with_routing: bool = False):
        if with_routing and self.routing is None:
            raise ValueError(f"{self.model_path}: routing asked of a dense model")
        return self._run(LogProbs(temperature, with_entropy, with_routing), batch)

    def rows_per_update(self, rows: int) -> int:
        return parallel.rows_per_update(rows, self.layout)

    def train_minibatch(self, batch: TokenBatch, loss_cfg: LossConfig, temperature: float,
                        scale: LossScale | None = None) -> dict:
        scale = scale or LossScale.of(batch.segment, loss_cfg.prefix_mode)
        out = self._run(TrainMinibatch(loss_cfg, temperature, scale), batch)
        return {**out, "segment": batch.segment.flatten(), **self.padding(batch)}

    def step_stats(self) -> dict[str, float]:
        """Bytes the driver sent its followers since the last call, and what broadcasting every call whole
        would have sent; on a GPU, the driver rank's peak allocated memory since the last call (what
        tools/plan_memory.py estimates)."""
        stats = self.channel.take_counts() if self.layout.world > 1 else {}
        if self.device.type == "cuda":
            stats["megatron/gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return stats

    def rollout_weights(self):
        return self._run(RolloutWeights())

    def save_hf(self, path: Path) -> None:
        self._run(SaveHF(Path(path)))

    def save_state(self, path: Path) -> None:
        self._run(SaveState(Path(path), self.version))

    def load_state(self, path: Path) -> None:
        self.version = self._run(LoadState(Path(path)))

    # ---- work every rank does ----------------------------------------------------------------------
    def _micro_batches(self, rows: RankRows) -> list:
        """[(rows of the whole batch, micro-batch)] of this data-parallel rank's samples (`_plan`)."""
        return [(rows.index[plan], rows.batch.select(torch.tensor(plan)))
                for plan in self._plan(rows.batch.attention_mask.sum(-1))]

    def _plan(self, lengths: torch.Tensor) -> list[list[int]]:
        """Micro-batches (indices into `lengths`) of one data-parallel rank's rows: by row count or token
        budget (`plan_micro_batches`); the interleaved schedule needs a multiple of pipeline_parallel of them."""
        n = len(lengths)
        if self.layout.vp == 1 or not n:  # actor.max_tokens_per_micro_batch is refused with virtual_pipeline > 1
            return plan_micro_batches(lengths.tolist(), self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        count = parallel.interleaved_microbatches(-(-n // self.cfg.micro_batch_size), n, self.layout)
        return [c.tolist() for c in torch.tensor_split(torch.arange(n), count)]

    def padding(self, batch: TokenBatch) -> dict:
        """Padding tokens and computed tokens of this batch's micro-batches, over every data-parallel rank."""
        pad = computed = 0
        lengths = batch.attention_mask.sum(-1)
        for dp_rank in range(self.layout.dp):
            mine = lengths[dp_rank::self.layout.dp]
            p, c = padding_share(mine.tolist(), self._plan(mine))
            pad, computed = pad + p, computed + c
        return {"padded_tokens": float(pad), "computed_tokens": float(computed)}

    def _token_logprobs(self, logits: torch.Tensor, mb: TokenBatch, part: parallel.SequenceSlice, temperature: float,
                        with_entropy: bool):
        """Log-probs (and entropy) of each next token at this rank's positions `part` (the last position
        predicts nothing: its target is padding, and results keep only the first T - 1 columns)."""
        from megatron.core import parallel_state as ps

        targets = part.take(mb.input_ids[:, 1:], self.device)
        return vocab_parallel_logprobs(logits, targets, self.vocab_start, self.arch.vocab_size, temperature,
                                       with_entropy, ps.get_tensor_model_parallel_group(),
                                       self.cfg.megatron.logprob_chunk)

    def _run_schedule(self, rows: RankRows, loss_of_logits, forward_only: bool, routed: Optional[list] = None,
                      expert_counts: Optional[torch.Tensor] = None) -> list:
        """This rank's microbatches through megatron's forward/backward schedule, each over this rank's
        positions of the sequence (all, or its share with context parallelism), a MoE model's routers
        replaying `mb.routing` where given. `loss_of_logits(logits, mb, part)` runs on the last pipeline stage
        and returns (loss, token count, per-token outputs at full width, zero at the other context-parallel
        ranks' positions). Returns [(rows, outputs)] per microbatch on the last stage, [] on the others;
        `routed` gets (rows, what this rank's routers chose) per microbatch and model chunk, `expert_counts`
        [layers, experts] adds the token slots this rank's routers gave each expert."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = self._micro_batches(rows)
        if not micro:  # fewer samples than data-parallel replicas (log-probs of a small batch)
            return []

        def forward_step(data_iterator, model):  # called per model chunk, each with its own pass over `micro`
            index, mb = next(data_iterator)
            part = parallel.SequenceSlice.of(mb.input_ids.shape[1], self.layout,
                                             self.chunks[0].config.sequence_parallel)
            ids = part.take(mb.input_ids, self.device)
            positions = part.index.to(self.device)[None].expand_as(ids)
            chunk = self.ddp.index(model)
            if self.routing is not None:
                self.routing.give(chunk, mb.routing, part)
            output = model(input_ids=ids, position_ids=positions, attention_mask=None)  # last stage: [N, T_r, V / tp]
            if routed is not None:
                routed.append((index, self.routing.taken(chunk, len(mb), part, self.arch.num_layers)))
            if expert_counts is not None:
                self.routing.count(chunk, mb.attention_mask, part, expert_counts)
            return output, lambda logits: loss_of_logits(logits, mb, part)

        with cpu_compat.cuda_on_cpu():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter(micro) for _ in self.ddp], model=self.ddp,
                num_microbatches=len(micro),
                seq_length=max(mb.input_ids.shape[1] for _, mb in micro),
                micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)
        return [(rows, out) for (rows, _), out in zip(micro, outputs)]

    def _sum_to_driver(self, *tensors: torch.Tensor) -> None:
        """Per-token results are made on the last stage of each context-parallel rank (its positions) of each
        data-parallel replica: sum them over those ranks, the replicas, then the stages, into global rank 0
        (other ranks end with partial sums)."""
        from megatron.core import parallel_state as ps

        for size, group in ((self.layout.cp, ps.get_context_parallel_group),
                            (self.layout.dp, ps.get_data_parallel_group),
                            (self.layout.pp, ps.get_pipeline_model_parallel_group)):
            if size > 1:
                for t in tensors:
                    self._all_reduce(t, group())

    def _train_mode(self, on: bool) -> None:
        for chunk in self.chunks:
            chunk.train(on)

    @torch.no_grad()
    def _logprobs(self, rows: RankRows, temperature: float, with_entropy: bool, with_routing: bool = False):
        self._train_mode(False)
        shape = (rows.total, rows.width - 1)
        logp = torch.zeros(shape)
        entropy = torch.zeros(shape)
        routed = [] if with_routing else None

        def per_token(logits, mb, part):
            lp, ent = self._token_logprobs(logits, mb, part, temperature, with_entropy)
            width = mb.input_ids.shape[1] - 1
            return torch.zeros(()), torch.tensor(0, dtype=torch.int), {
                "logp": part.put(lp, width), "entropy": part.put(ent, width) if with_entropy else None}

        for index, out in self._run_schedule(rows, per_token, forward_only=True, routed=routed):
            width = out["logp"].shape[1]
            logp[index, :width] = out["logp"].cpu()
            if with_entropy:
                entropy[index, :width] = out["entropy"].cpu()
        self._sum_to_driver(logp, entropy)
        if not with_routing:
            return logp, (entropy if with_entropy else None)
        return logp, (entropy if with_entropy else None), self._routing_to_driver(rows, routed)

    def _routing_to_driver(self, rows: RankRows, routed: list) -> torch.Tensor:
        """What the routers chose, [rows, T-1, layers, k] on global rank 0: every (row, position, layer) is
        routed by one rank (its data-parallel replica, context- and, under the sequence parallelism MoE layers
        need with tensor parallelism, tensor-parallel rank, pipeline stage), so a sum over ranks assembles it."""

        out = torch.zeros(rows.total, rows.width - 1, self.arch.num_layers, self.arch.moe_top_k, dtype=torch.int32)
        for index, chosen in routed:
            width = min(chosen.shape[1], rows.width - 1)
            out[index, :width] += chosen[:, :width].int()
        return self._sum_over_routing_ranks(out).to(torch.int16)

    def _sum_over_routing_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks that route distinct tokens or layers (in place; every rank gets the sum)."""
        from megatron.core import parallel_state as ps

        for size, group in ((self.layout.tp, ps.get_tensor_model_parallel_group),
                            (self.layout.cp, ps.get_context_parallel_group),
                            (self.layout.dp, ps.get_data_parallel_group),
                            (self.layout.pp, ps.get_pipeline_model_parallel_group)):
            if size > 1:
                self._all_reduce(t, group())
        return t

    def _all_reduce(self, t: torch.Tensor, group) -> None:
        """Sum the host tensor `t` over `group` in place, through the GPU where there is one (NCCL reduces
        device tensors only)."""
        if self.device.type == "cpu":
            dist.all_reduce(t, group=group)
            return
        on_device = t.to(self.device)
        dist.all_reduce(on_device, group=group)
        t.copy_(on_device)

    def _train_minibatch(self, rows: RankRows, loss_cfg: LossConfig, temperature: float, scale: LossScale) -> dict:
        from megatron.core.distributed import finalize_model_grads

        parallel.check_batch_split(rows.total, self.layout)
        self._train_mode(True)
        for ddp in self.ddp:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

        def soup(logits, mb, part):
            logp, ent = self._token_logprobs(logits, mb, part, temperature, True)  # entropy is logged per segment
            mask = loss_mask(mb.segment, loss_cfg.prefix_mode)
            # weights from whole rows (per-sequence means), then this rank's positions
            weights = part.take(aggregation_weights(mask, loss_cfg.loss_agg, scale.sequences, scale.tokens),
                                self.device)
            take = functools.partial(part.take, device=self.device)
            loss, tok = soup_loss(logp, take(mb.old_logp), take(mb.behaviour_logp), mb.advantages.to(self.device),
                                  take(mb.segment), weights, loss_cfg, entropy=ent, ref_logp=take(mb.ref_logp),
                                  correction=take(mb.correction))
            width = mb.segment.shape[1]
            per_token = {k: part.put(v.float(), width) for k, v in {**tok, "entropy": ent.detach()}.items()}
            per_token["loss"] = loss.detach()
            return loss, torch.tensor(int(take(mask).sum()), dtype=torch.int), per_token

        shape = (rows.total, rows.width - 1)
        stats = {k: torch.zeros(shape) for k in PER_TOKEN_STATS}
        total_loss = torch.zeros(1)
        counts = (torch.zeros(self.arch.num_layers, self.arch.num_experts, dtype=torch.long) if self.arch.is_moe
                  else None)
        for index, out in self._run_schedule(rows, soup, forward_only=False, expert_counts=counts):
            width = out["ratio"].shape[1]
            for key, value in stats.items():
                value[index, :width] = out[key].cpu()
            total_loss += out["loss"].cpu()
        with cpu_compat.cuda_on_cpu():
            # sums gradients over data-parallel ranks and over a tied embedding's two pipeline stages
            # (num_tokens=None: no rescaling, the loss already carries the batch's token weights)
            finalize_model_grads(self.ddp, num_tokens=None)
            _, grad_norm, _ = self.optimizer.step()  # norm before clipping, every slice counted once
        self._train_mode(False)
        self._sum_to_driver(*stats.values(), total_loss)
        out = {**per_token_stats(stats), "loss": float(total_loss), "grad_norm": float(grad_norm)}
        if counts is not None:
            out["moe/expert_load_max"] = load_max(self._sum_over_routing_ranks(counts))
            out.update(self._router_losses(len(self._plan(rows.batch.attention_mask.sum(-1)))))
        return out

    def _router_losses(self, micro_batches: int) -> dict[str, float]:
        """The router's own losses of this update (actor.moe.aux_loss_coef, z_loss_coef), as megatron tracks
        them: summed per layer over the micro-batches, reduced over the ranks (megatron's
        reduce_aux_losses_tracker_across_ranks), then the mean per layer and micro-batch; {} when none is on."""
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if not tracker:
            return {}
        with cpu_compat.cuda_on_cpu():
            moe_utils.reduce_aux_losses_tracker_across_ranks()
        losses = {f"moe/{name}": float(entry["values"].sum()) / (self.arch.num_layers * max(micro_batches, 1))
                  for name, entry in tracker.items()}
        moe_utils.clear_aux_losses_tracker()
        return losses

    def _rollout_weights(self):
        tensors = checkpoint.iter_hf_tensors(self.chunks, self.params, self.arch, self.layout)
        weights = {name: t for name, t in tensors}
        return weights if self.layout.is_driver else None

    def _save_hf(self, path: Path) -> None:
        tensors = checkpoint.iter_hf_tensors(self.chunks, self.params, self.arch, self.layout)
        checkpoint.write_hf(path, tensors, self.model_path, self.layout.is_driver)

    def _save_state(self, path: Path, version: int) -> None:
        checkpoint.save_distributed(path, self.chunks, self.optimizer, self.layout,
                                    {"version": version, "has_optimizer": True, "architecture": asdict(self.arch),
                                     "params_dtype": self.cfg.megatron.params_dtype,
                                     "distributed_optimizer": self.sharded_optimizer,
                                     "saved_with": self._saved_with()},
                                    hf_files_from=self.model_path)

    def _saved_with(self) -> dict:
        """The sizes a sharded optimizer's state is tied to (expert parallel only when used: states saved
        before it existed have none)."""
        return {"tp": self.layout.tp, "pp": self.layout.pp, **({"ep": self.layout.ep} if self.layout.ep > 1 else {})}

    def _load_state(self, path: Path) -> int:
        meta = checkpoint.read_metadata(path)
        sharded = self.sharded_optimizer
        if meta.get("distributed_optimizer") != sharded:
            saved = "sharded" if meta.get("distributed_optimizer") else "replicated"
            raise CheckpointError(f"{path} holds the state of a {saved} "
                                  f"optimizer and this actor's is {'sharded' if sharded else 'replicated'} "
                                  "(actor.megatron.distributed_optimizer with more than one data x context-parallel "
                                  "rank); resume with the same setting and data x context parallel > 1 or = 1 as saved")
        here = self._saved_with()
        if sharded and meta.get("saved_with") != here:
            # megatron-core 0.16's layout-free format for it fails with torch's Adam (no TE / apex)
            raise CheckpointError(f"{path}: the distributed optimizer's state was saved at {meta.get('saved_with')} "
                                  f"and loads only under the same tensor / pipeline / expert sizes (data parallel "
                                  f"may change), not {here}")
        return checkpoint.load_distributed(path, self.chunks, self.optimizer, self.layout)["version"]

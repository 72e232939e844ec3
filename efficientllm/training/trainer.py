"""The training loop: megatron-core pipeline schedules, DDP, optimizer, LR schedule, eval.

A step, top to bottom: the schedule runs forward/backward over this rank's micro-batches and
megatron's `finalize_model_grads` reduces gradients over DP; the optimizer clips and steps; the
LR scheduler advances by one global batch; the loss is averaged over DP for the log.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from efficientllm import distributed
from efficientllm.architecture import Architecture, architecture_from_config
from efficientllm.config import Config, check_output_dirs
from efficientllm.data.prepare import PreparedData, prepare_data
from efficientllm.evaluation import in_training
from efficientllm.evaluation.in_training import TrainingEvaluation
from efficientllm.interop.hf_config import resolve_from_hf
from efficientllm.interop.hf_import import load_hf_weights
from efficientllm.model import build_model_chunks, model_options, rebuilt_after_pruning, require_transformer_engine
from efficientllm.reporting.plots import plot_pruning, read_records
from efficientllm.training import after_pruning, checkpoint
from efficientllm.training.batches import micro_batches
from efficientllm.training.metrics import MetricsLogger
from efficientllm.training.optimizer import build_optimizer, wrap_ddp
from efficientllm.training.pruning import PruningPass, describe_event, target_architecture
from efficientllm.training.signals import EXIT_RESUMABLE, PreemptionHandler
from efficientllm.training.start import describe_start, resolve_start, with_checkpoint_tokenizer


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict]:
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask) / mask.sum().clamp(min=1)
    # The schedule divides the returned loss in place by the number of micro-batches: report a copy.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, config: Config, launch: distributed.LaunchEnv | None = None):
        # model.from_hf: the shapes and hyper-parameters come from the Hugging Face config
        self.config = config = with_checkpoint_tokenizer(resolve_from_hf(config))
        self.launch = launch or distributed.read_launch_env()
        config.validate(self.launch.world_size)
        if config.prune.target_architecture is not None:  # reachable? (the vocabulary does not matter)
            target_architecture(config, architecture_from_config(config, vocab_size=1))
        for field in ("transformer_impl", "transformer_impl_after_pruning"):
            if getattr(config.model, field) == "transformer_engine":
                require_transformer_engine(f"model.{field}")  # now, not after the pruning phase
        check_output_dirs(config)
        self.run_dir = Path(config.run_dir)
        self.state = TrainState()
        self.data: PreparedData | None = None  # set by setup()
        self.log: MetricsLogger | None = None
        self.pruning: PruningPass | None = None
        self.training_eval: TrainingEvaluation | None = None  # training.eval_tasks / eval_text
        self.start_time = time.monotonic()
        # Extra state saved with every checkpoint: name -> object with state_dict() and
        # load_state_dict(), or sharded_state_dict() (see training/checkpoint.py). Register
        # before setup() loads the checkpoint; replicated state registered later still gets
        # its saved state on registration.
        self.checkpointables: dict[str, Any] = {}
        self.pending_extra_state: dict[str, Any] = {}
        self.save_dir = Path(config.checkpoint.save or self.run_dir / "checkpoints")
        self.exit_code = 0  # EXIT_RESUMABLE when stopped early with a checkpoint written
        self._process_groups = contextlib.ExitStack()  # formed by setup(), shut down by close()

    def register_checkpointable(self, name: str, obj: Any) -> None:
        self.checkpointables[name] = obj
        if name in self.pending_extra_state:
            obj.load_state_dict(self.pending_extra_state.pop(name))

    # ----- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        p = c.parallel
        self._process_groups.enter_context(distributed.process_groups(
            self.launch,
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
            c.training.seed,
        ))
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = c.training.global_batch_size // (c.training.micro_batch_size * self.dp_size)
        self.data: PreparedData = prepare_data(c, self.run_dir)
        self.training_eval = in_training.from_config(c, self.data.tokenizer)  # reads its data now
        # A checkpoint's own Architecture (perhaps pruned) is built before its shards load.
        begin = resolve_start(c, self.save_dir)
        meta = checkpoint.read_meta(begin.checkpoint) if begin.checkpoint else {}
        if begin.checkpoint:
            arch = checkpoint.architecture_for_load(meta, c, begin.checkpoint)
        else:
            arch = architecture_from_config(c, self.data.tokenizer.vocab_size)
        iteration = meta["iteration"] if begin.resumes else 0
        self.data.check_vocab(arch.vocab_size)
        self.build_model(arch, iteration)
        if begin.weights_only:  # finetune: the weights alone; optimizer and schedule start fresh
            checkpoint.start_from_weights(self, begin.checkpoint)
        elif c.model.from_hf and not begin.checkpoint:  # each rank reads only its slices of the HF weights
            load_hf_weights([chunk.module for chunk in self.model], c.model.from_hf, arch)
            self.optimizer.reload_model_params()  # fp32 main params (bf16) follow the new weights
        if c.prune.enabled:
            # The schedule is measured from the configured source model, also when resuming a
            # checkpoint that is already pruned.
            source = architecture_from_config(c, self.data.tokenizer.vocab_size)
            if rebuilt_after_pruning(c, iteration):  # resumed after the pruning phase
                self.register_checkpointable(
                    "pruning", after_pruning.FinishedPruning(source, meta["extra"].get("pruning")))
            else:
                self.pruning = PruningPass(self, source)
                self.register_checkpointable("pruning", self.pruning)
        if begin.resumes:
            checkpoint.load(self, begin.checkpoint)
        self.log = MetricsLogger(
            self.run_dir,
            c.training.train_iters,
            self.state.iteration,
            enabled=distributed.is_logging_rank(),
            tensorboard=c.training.tensorboard,
        )
        said = describe_start(begin, c, self.state.iteration)
        if said:
            self.log.print(said)
        self._record_placement()

    def _record_placement(self) -> None:
        """Where and how the model computes: device, backend, parameter dtype, layer spec."""
        self.log.record("run", self.state.iteration, {
            "device": str(distributed.device()), "backend": dist.get_backend(),
            "params_dtype": str(next(self.model[0].parameters()).dtype).removeprefix("torch."),
            "transformer_impl": "transformer_engine" if self.options.transformer_engine else "local",
        })

    def build_model(self, arch: Architecture, iteration: int = 0) -> None:
        self.options = model_options(self.config, iteration)
        self.install_model(arch, build_model_chunks(arch, self.options))

    def rebuild_after_pruning(self, ckpt: Path) -> None:
        """After the last pruning event: rebuild the model with the spec for the continued
        pretraining, `model.transformer_impl_after_pruning`, and load checkpoint `ckpt` (just
        written) into it: weights, optimizer state, LR schedule, RNG."""
        assert self.pruning is not None
        record = after_pruning.FinishedPruning(self.pruning.source, self.pruning.summary(), self.pruning.plans)
        self.register_checkpointable("pruning", record)
        self.pruning = None  # the pass, its hooks and statistics go with the old model
        self.model = self.optimizer = None  # the checkpoint holds it all: free the old first
        self.build_model(self.arch, self.state.iteration)
        checkpoint.load(self, ckpt)
        self.log.print(f"pruning finished at iteration {self.state.iteration}: training on with "
                       f"{self.config.model.transformer_impl_after_pruning} layers, loaded from {ckpt}")
        self._record_placement()

    def install_model(self, arch: Architecture, chunks: list) -> None:
        """Train `chunks` (built for `arch`): fresh DDP buffers and optimizer; the LR schedule
        carries on where it was (a pruning event does not restart warmup)."""
        schedule = self.scheduler.state_dict() if getattr(self, "scheduler", None) else None
        self.arch = arch
        self.model = wrap_ddp(chunks, self.config.parallel)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.config.training, self.config.parallel)
        if schedule is not None:
            self.scheduler.num_steps = 0  # megatron's load adds the saved steps to its own
            self.scheduler.load_state_dict(schedule)

    def _iterators(self, dataset, consumed: int) -> list[Iterator] | Iterator:
        """One iterator per model chunk (virtual pipeline stages each read the same batches)."""
        make = lambda: micro_batches(dataset, consumed, self.config.training.micro_batch_size, self.dp_rank,
                                     self.dp_size, distributed.device())
        return [make() for _ in self.model] if len(self.model) > 1 else make()

    # ----- one step ----------------------------------------------------------------------
    def _run_schedule(self, data_iterator, num_microbatches: int, forward_only: bool) -> float | None:
        """Forward(/backward) over the micro-batches; the mean loss on the last stage, else None."""
        c = self.config
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=num_microbatches,
            seq_length=c.data.seq_length,
            micro_batch_size=c.training.micro_batch_size,
            forward_only=forward_only,
        )
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return torch.stack([l["lm loss"] for l in losses]).mean().item()

    def _mean_over_replicas(self, value: float | None) -> float:
        """Average a last-stage value over DP; every rank gets it (one tiny all-reduce)."""
        counted = value is not None and parallel_state.get_tensor_model_parallel_rank() == 0
        t = torch.tensor([value if counted else 0.0, 1.0 if counted else 0.0], dtype=torch.float64,
                         device=distributed.device())
        dist.all_reduce(t)
        return (t[0] / t[1]).item()

    def train_step(self, data_iterator) -> dict[str, float]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(data_iterator, self.num_microbatches, forward_only=False)
        if self.pruning is not None:
            self.pruning.after_backward(self.state.iteration + 1)
        update_successful, grad_norm, _ = self.optimizer.step()
        if self.pruning is not None:  # a skipped step (non-finite gradients) is not scored
            self.pruning.after_optimizer_step(self.state.iteration + 1, update_successful)
        if update_successful:
            self.scheduler.step(increment=self.config.training.global_batch_size)
        self.state.iteration += 1
        self.state.consumed_samples += self.config.training.global_batch_size
        return {
            "loss": self._mean_over_replicas(loss),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        c = self.config.training
        for chunk in self.model:
            chunk.eval()
        per_round = c.micro_batch_size * self.dp_size
        iterator = self._iterators(self.data.valid, 0)
        loss = self._run_schedule(iterator, c.eval_iters * self.num_microbatches, forward_only=True)
        for chunk in self.model:
            chunk.train()
        mean = self._mean_over_replicas(loss)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "samples": c.eval_iters * per_round * self.num_microbatches}

    # ----- the loop ----------------------------------------------------------------------
    def train(self) -> TrainState:
        c = self.config.training
        save_interval = self.config.checkpoint.save_interval
        tokens_per_step = c.global_batch_size * self.config.data.seq_length
        iterator = self._iterators(self.data.train, self.state.consumed_samples)
        preemption = PreemptionHandler().install() if c.exit_signal_handler else PreemptionHandler()
        window_start, window_steps = time.perf_counter(), 0
        while self.state.iteration < c.train_iters:
            if self.pruning is not None:
                self.pruning.before_step(self.state.iteration + 1)
            metrics = self.train_step(iterator)
            window_steps += 1
            step = self.state.iteration
            self.state.history.append({"step": step, "loss": metrics["loss"]})
            event = self.pruning.after_step(step) if self.pruning is not None else None
            if event is not None:
                event["tokens"] = self.state.consumed_samples * self.config.data.seq_length
                self.log.record("prune", step, event, echo=False)
                self.log.print(describe_event(step, event))
            if step % c.log_interval == 0 or step == c.train_iters:
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    tokens=self.state.consumed_samples * self.config.data.seq_length,
                    tokens_per_s=window_steps * tokens_per_step / elapsed,
                    params=self.arch.num_parameters(),
                )
                self.log.record("train", step, metrics)
                window_start, window_steps = time.perf_counter(), 0
            else:
                self.log.record("train", step, metrics, echo=False)
            if c.eval_interval and (step % c.eval_interval == 0 or step == c.train_iters):
                self.log.record("valid", step, self.evaluate())
                if self.training_eval is not None:
                    scores = self.training_eval(self.model)
                    self.log.record("eval", step, {"tokens": self.state.consumed_samples * self.config.data.seq_length,
                                                   **scores}, echo=False)
                    self.log.print(in_training.describe(step, scores))
            stop = self._stop_reason(step, preemption) if step < c.train_iters else None
            saved = None
            if stop or step == c.train_iters or (save_interval and step % save_interval == 0):
                saved = self.save_checkpoint()
            if stop:
                self.log.print(f"stopping at iteration {step} ({stop}); resume with checkpoint.load={self.save_dir}")
                self.exit_code = EXIT_RESUMABLE
                break
            if after_pruning.rebuild_due(self.config, step):
                self.rebuild_after_pruning(saved or self.save_checkpoint())
        preemption.uninstall()
        return self.state

    def _stop_reason(self, step: int, preemption: PreemptionHandler) -> str | None:
        """Why to stop before train_iters, agreed by every rank (one tiny all-reduce)."""
        c = self.config.training
        elapsed_mins = (time.monotonic() - self.start_time) / 60
        flags = torch.tensor(
            [preemption.requested, c.exit_duration_in_mins is not None and elapsed_mins > c.exit_duration_in_mins],
            dtype=torch.int32,
            device=distributed.device(),
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return "signal"
        if flags[1]:
            return f"exit_duration_in_mins={c.exit_duration_in_mins}"
        if c.exit_interval and step % c.exit_interval == 0:
            return f"exit_interval={c.exit_interval}"
        return None

    def save_checkpoint(self) -> Path:
        start = time.perf_counter()
        path = checkpoint.save(self, self.save_dir)
        self.log.print(f"saved checkpoint {path} in {time.perf_counter() - start:.2f}s")
        return path

    def finish(self) -> None:
        """Write the run's results (architecture table and JSON, the pruning figure) and say
        where they are, with the held-out perplexity of the final model."""
        assert self.log is not None
        if not self.log.enabled:
            return
        run = self.run_dir.resolve()
        (run / "architecture.json").write_text(self.arch.to_json())
        (run / "architecture.txt").write_text(self.arch.table() + "\n")
        lines = [f"final architecture:\n{self.arch.table()}"]
        pruning = self.checkpointables.get("pruning")  # the pass, or its record once finished
        if pruning is not None:
            events = read_records(run / "metrics.jsonl", "prune")
            if events:
                figure = plot_pruning(events, pruning.source, self.arch, run / "pruning.png")
                lines.append(f"pruning figure: {figure}")
        valid = read_records(run / "metrics.jsonl", "valid")
        if valid:
            lines.append(f"held-out loss {valid[-1]['loss']:.4f}, perplexity {valid[-1]['ppl']:.2f} "
                         f"(step {valid[-1]['step']})")
        last = checkpoint.read_tracker(self.save_dir)
        if last is not None:
            lines.append(f"final checkpoint: {checkpoint.iteration_dir(self.save_dir, last).resolve()}")
        lines.append(f"run directory: {run} (metrics.jsonl, tensorboard/, architecture.txt)")
        self.log.print("\n".join(lines))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        self._process_groups.close()

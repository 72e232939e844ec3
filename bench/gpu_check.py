"""The GPU path in one short run on one GPU, rehearsed on the CPU; bench/gpu_check.sh runs it.

Steps, each its own process with its own time limit, each checked before the next:
1. preflight: CUDA torch sees a GPU and has NCCL; megatron-core is a supported version; whether
   Transformer Engine is importable (then the continued pretraining runs on TE layers);
2. the pruning-aware job through launch/torchrun.sh on one rank: NCCL, bf16 with fp32 main
   params, an event every step of the pruning phase, stopped in the middle of that phase with
   a checkpoint (`training.exit_interval`, exit code 75);
3. the same job resumed from that checkpoint: the remaining events, the rebuild after the last
   one, continued pretraining, the final checkpoint;
4. what the two runs wrote: device, backend and dtype; every event; the resume point; the
   rebuild; the target size; finite, falling losses; `efficientllm inspect` of the result;
5. tokens/s and MFU of a dense SmolLM-360M-shaped model (362M parameters) at bf16, our loop
   beside a bare megatron-core loop on the same model (bench/train_throughput.py).

GPU_CHECK_CPU_REHEARSAL=1 runs the same steps on the CPU (gloo, fp32, tiny sizes), so the
script cannot fail on the GPU for a trivial reason. Exit status 0 only when every check passed;
the figures go to GPU_CHECK_DIR/summary.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the package is this checkout
REHEARSAL = os.environ.get("GPU_CHECK_CPU_REHEARSAL") == "1"
OUT = Path(os.environ.get("GPU_CHECK_DIR", REPO / "runs/gpu_check")).resolve()

# The pruning-aware job: (GPU, CPU rehearsal). Events every step from start to end; the first
# run stops at `stop`, inside the pruning phase.
JOB = {
    "model": ({"hidden_size": 512, "num_layers": 8, "num_attention_heads": 8, "num_query_groups": 4,
               "ffn_hidden_size": 1536},
              {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
               "ffn_hidden_size": 128}),
    "data": ({"seq_length": 1024, "corpus_max_bytes": 2_000_000, "tokenizer_vocab_size": 4096},
             {"seq_length": 64, "corpus_max_bytes": 200_000, "tokenizer_vocab_size": 512}),
    "training": ({"micro_batch_size": 8, "global_batch_size": 16, "train_iters": 50, "lr_warmup_iters": 5,
                  "log_interval": 5, "eval_interval": 25, "eval_iters": 2, "bf16": True},
                 {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 10, "lr_warmup_iters": 1,
                  "log_interval": 1, "eval_interval": 5, "eval_iters": 1, "bf16": False}),
    "prune": ({"enabled": True, "target_ratio": 0.5, "start_step": 15, "end_step": 30, "interval": 1,
               "align": 8, "min_hidden": 128, "min_ffn_per_layer": 64},
              {"enabled": True, "target_ratio": 0.6, "start_step": 3, "end_step": 6, "interval": 1,
               "align": 2, "min_hidden": 16, "min_ffn_per_layer": 8}),
}
STOP = (22, 5)
# The throughput model: SmolLM-360M's shape, dense (GPU); a tiny one (rehearsal).
THROUGHPUT = (
    ["model.hidden_size=960", "model.num_layers=32", "model.num_attention_heads=15", "model.num_query_groups=5",
     "model.ffn_hidden_size=2560", "model.vocab_size=49152", "model.untie_embeddings_and_output_weights=false",
     "data.seq_length=2048", "training.micro_batch_size=4", "training.global_batch_size=16", "training.bf16=true"],
    ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
     "model.ffn_hidden_size=128", "data.seq_length=64", "training.micro_batch_size=2",
     "training.global_batch_size=4"],
)
THROUGHPUT_STEPS = (["--steps", "10", "--rounds", "3"], ["--steps", "2", "--rounds", "1"])
# Seconds per step of the check (GPU, rehearsal on 2 shared cores); they add up to 8 minutes.
LIMITS = {"prune": (150, 240), "resume": (120, 240), "inspect": (30, 60), "throughput": (150, 240)}


def pick(pair: tuple) -> Any:
    return pair[1] if REHEARSAL else pair[0]


class CheckFailed(RuntimeError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def run(step: str, argv: list[str], expect: int = 0, env: dict[str, str] | None = None) -> str:
    """Run one step as a process with its time limit; returns its stdout. Its stderr (and its
    stdout) go to OUT/<step>.log."""
    log = OUT / f"{step}.log"
    start = time.perf_counter()
    # This checkout's package, also where it is not pip-installed (a bare GPU machine).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # Its own process group, so that a step past its limit is stopped with every rank it started.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=pick(LIMITS[step]))
        timed_out = False
    except subprocess.TimeoutExpired:
        _stop_group(proc.pid)
        stdout, stderr = proc.communicate()
        timed_out = True
    _stop_group(proc.pid)  # what a rank left behind (megatron's checkpoint writer, say)
    log.write_text(f"{stdout}\n--- stderr ---\n{stderr}")
    if timed_out:
        raise CheckFailed(f"{step}: still running after {pick(LIMITS[step])}s (log {log})")
    if proc.returncode != expect:
        tail = "\n".join(f"{stdout}\n{stderr}".splitlines()[-25:])
        raise CheckFailed(f"{step}: exit code {proc.returncode}, expected {expect} (log {log}):\n{tail}")
    print(f"[gpu_check] {step}: ok in {time.perf_counter() - start:.0f}s", flush=True)
    return stdout


def _stop_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def preflight() -> dict[str, Any]:
    """In this process: what the machine offers (nothing of megatron's state is touched)."""
    try:
        import torch

        import megatron_patches

        megatron_patches.check_version()
    except ImportError as err:
        raise CheckFailed(f"cannot import what the check needs ({err}): install CUDA torch, "
                          f"megatron-core==0.16.1 and this package's dependencies") from None
    info: dict[str, Any] = {"torch": torch.__version__, "megatron_core": str(megatron_patches.megatron_core_version())}
    try:
        import transformer_engine  # noqa: F401

        info["transformer_engine"] = True
    except (ImportError, OSError):
        info["transformer_engine"] = False
    if not REHEARSAL:
        require(torch.cuda.is_available(), "no CUDA device: torch.cuda.is_available() is False "
                                           "(set GPU_CHECK_CPU_REHEARSAL=1 to rehearse on the CPU)")
        require(torch.distributed.is_nccl_available(), "this torch build has no NCCL")
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu (rehearsal)"
    print(f"[gpu_check] preflight: {info}", flush=True)
    return info


def job_config(after_pruning: str) -> Path:
    config = {section: dict(pick(values)) for section, values in JOB.items()}
    config["run_dir"] = str(OUT / "prune")
    config["model"]["transformer_impl_after_pruning"] = after_pruning
    config["training"]["tensorboard"] = False
    config["checkpoint"] = {"save_interval": pick(STOP), "keep_last": 2}
    path = OUT / "prune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def check_job(config_path: Path, after_pruning: str) -> dict[str, Any]:
    """What the stopped and the resumed run wrote, against what the job must have done."""
    config = yaml.safe_load(config_path.read_text())
    t, pr, stop = config["training"], config["prune"], pick(STOP)
    run_dir = Path(config["run_dir"])
    device, backend, dtype = ("cpu", "gloo", "float32") if REHEARSAL else ("cuda", "nccl", "bfloat16")
    placements = records(run_dir, "run")
    require([p["step"] for p in placements] == [0, stop, pr["end_step"]],
            f"expected a start, a resume at {stop} and a rebuild at {pr['end_step']}: {placements}")
    for p in placements:
        require(p["device"].startswith(device) and p["backend"] == backend and p["params_dtype"] == dtype,
                f"ran on {p['device']}/{p['backend']}/{p['params_dtype']}, expected {device}/{backend}/{dtype}")
    require(placements[-1]["transformer_impl"] == after_pruning,
            f"the continued pretraining ran on {placements[-1]['transformer_impl']}, expected {after_pruning}")
    train = records(run_dir, "train")
    require([r["step"] for r in train] == list(range(1, t["train_iters"] + 1)),
            "every step is logged once across the stop and the resume")
    losses = [r["loss"] for r in train]
    require(all(math.isfinite(l) for l in losses), f"non-finite losses: {losses}")
    require(sum(losses[-3:]) / 3 < losses[0], f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
    events = records(run_dir, "prune")
    steps = [e["step"] for e in events]
    require(steps and min(steps) >= pr["start_step"] and max(steps) <= pr["end_step"], f"events at {steps}")
    require(any(s <= stop for s in steps) and any(s > stop for s in steps),
            f"events before and after the resume at {stop}: {steps}")
    inspect = json.loads(run("inspect", [sys.executable, "-m", "efficientllm", "inspect",
                                         str(run_dir / "checkpoints"), "--json"]))
    require(inspect["iteration"] == t["train_iters"], f"final checkpoint at {inspect['iteration']}")
    source, final = events[0]["params_before"], inspect["num_parameters"]
    target = round(pr["target_ratio"] * source)
    require(abs(final - target) <= 0.02 * source, f"{final:,} parameters after pruning, target {target:,}")
    return {"events": len(events), "source_params": source, "final_params": final, "target_params": target,
            "first_loss": losses[0], "last_loss": losses[-1], "continued_on": after_pruning}


def main() -> int:
    start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"rehearsal": REHEARSAL}
    try:
        summary["machine"] = preflight()
        after = "transformer_engine" if summary["machine"]["transformer_engine"] else "local"
        config = job_config(after)
        torchrun = [str(REPO / "launch/torchrun.sh"), str(config)]
        from efficientllm.distributed import free_port

        launch_env = {"NPROC": "1", "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
        run("prune", [*torchrun, "--set", f"training.exit_interval={pick(STOP)}"], expect=75, env=launch_env)
        run("resume", [*torchrun, "--set", f"checkpoint.load={OUT / 'prune/checkpoints'}"], env=launch_env)
        summary["job"] = check_job(config, after)
        data = OUT / "prune/data"  # the job's tokenised corpus, reused
        run("throughput", [sys.executable, str(REPO / "bench/train_throughput.py"), *pick(THROUGHPUT_STEPS),
                           "--json", str(OUT / "throughput.json"), "--set", f"run_dir={OUT / 'throughput'}",
                           "--set", f"data.data_path=[{data / 'train'}]", "--set", f"data.valid_data_path=[{data / 'valid'}]",
                           "--set", f"data.tokenizer_model={data / 'tokenizer.model'}",
                           *[a for o in pick(THROUGHPUT) for a in ("--set", o)]])
        summary["throughput"] = json.loads((OUT / "throughput.json").read_text())
        require(summary["throughput"]["ours_tokens_per_s"] > 0, "no throughput measured")
    except CheckFailed as err:
        summary["failed"] = str(err)
        print(f"[gpu_check] FAILED: {err}", file=sys.stderr, flush=True)
    summary["seconds"] = time.perf_counter() - start
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    if "failed" in summary:
        return 1
    tp = summary["throughput"]
    mfu = f", MFU ours {tp['ours_mfu']:.1%} bare {tp['bare_mfu']:.1%}" if "ours_mfu" in tp else ""
    print(f"[gpu_check] passed in {summary['seconds']:.0f}s: {summary['job']['events']} events, "
          f"{summary['job']['source_params']:,} -> {summary['job']['final_params']:,} params, resumed, "
          f"continued on {summary['job']['continued_on']}; {tp['params']:,}-param dense model {tp['dtype']}: "
          f"ours {tp['ours_tokens_per_s']:,.0f} tokens/s, bare {tp['bare_tokens_per_s']:,.0f} "
          f"(ratio {tp['ratio']:.3f}){mfu}; summary {OUT / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU step benchmark: bf16 ViT-B-32, CLIP vs AmorLIP vs open_clip's ClipLoss, synthetic data (issue 7, item 5).

Run by ``benchmarks/gpu.sh`` on one GPU (H200-class; no internet; well under 10 minutes). For batch
1024 and 2048 it times, on one shared ViT-B-32 (random init; weights' values do not change the
time) and one fused AdamW:

- ``clip``: our :class:`amorlip.tasks.ClipTask` step;
- ``amorlip-t1`` / ``amorlip-t8``: our :class:`amorlip.tasks.AmorlipTask` step with T_online 1 and 8
  (steady state: epoch 1, beta > 0, paper Table 2: +4.47 % / +2.16 % on one H100);
- ``open_clip``: open_clip's own ``ClipLoss`` on the same model outputs (the reference CLIP step).

Each step is forward under ``torch.autocast(bfloat16)`` (losses and lambda nets stay fp32 inside the
tasks), backward, grad-clip 1.0, AdamW step, logit-scale clamp; images and tokens are synthetic and
already on the device, so the figures are the compute side only. Contenders alternate in blocks of
8 steps (one T_online = 8 period) after a warm-up block; reported: median steps/s, ratio to our
CLIP step, peak memory (``torch.cuda.max_memory_allocated`` during the contender's blocks; the
model and optimizer are shared, so the difference between contenders is the method's own), FLOPs
per step (FlopCounterMode) and achieved TFLOP/s against a measured bf16 matmul rate. No DeepSpeed:
on one GPU ZeRO-1 has nothing to shard, and the script must run with torch, open_clip, jsonschema
and PyYAML alone.

``--tiny`` runs the same code on CPU (fp32, amorlip-tiny model, batch 8) for the smoke test.

    python -m benchmarks.gpu_step [--tiny] [--batch-sizes 1024 2048] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time

import torch

from benchmarks.common import goal, print_table, setup_logging, spread, write_result
from benchmarks.flops import count_flops, matmul_rate

log = logging.getLogger(__name__)

BLOCK = 8
GOAL_RATIO_T8 = 1.03


def run_config(method: str, batch: int, t_online: int = 1):
    """A RunConfig with the schema's defaults (the large-scale settings) for the synthetic benchmark."""
    from amorlip.config import expand_runs, load_config

    override = {"method": method, "batch_size": batch, "epochs": 32, "warmup_steps": 0}
    if method == "amorlip":
        override["amorlip"] = {"t_online": t_online}
    config = load_config({"runs": {"bench": override}}, check_paths=False)
    return expand_runs(config)["bench"]


class OpenClipTask:
    """open_clip's ClipLoss behind the task interface (the reference CLIP step)."""

    def __init__(self, model):
        from open_clip.loss import ClipLoss

        self.model = model
        self.loss = ClipLoss()

    def start_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        pass

    def training_forward(self, images, texts, step_in_epoch: int) -> dict:
        out = self.model(images, texts)
        return {"loss": self.loss(out["image_features"], out["text_features"], out["logit_scale"])}

    def after_encoder_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)


class Contender:
    """One method's step on the shared model; ``__call__`` times a block and returns s/step."""

    def __init__(self, name, task, optimizer, images, texts, device, autocast_dtype):
        self.name, self.task, self.optimizer = name, task, optimizer
        self.images, self.texts, self.device = images, texts, device
        self.autocast_dtype = autocast_dtype
        self.step_in_epoch = 0
        self.peak_bytes = 0

    def step(self) -> None:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            out = self.task.training_forward(self.images, self.texts, self.step_in_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), 1.0)
        self.optimizer.step()
        self.task.after_encoder_step()
        self.step_in_epoch += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self) -> float:
        self.step_in_epoch -= self.step_in_epoch % BLOCK
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(BLOCK):
            self.step()
        self._sync()
        elapsed = (time.perf_counter() - t0) / BLOCK
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        return elapsed

    def __call__(self) -> list[float]:
        return [self.block()]


def bench_batch(model_name: str, batch: int, rounds: int, device: torch.device, dtype) -> dict:
    """All contenders at one batch size on one shared model; returns per-contender figures."""
    from amorlip.models import create_model, model_config
    from amorlip.tasks import build_task

    torch.manual_seed(0)
    model, _, _ = create_model(model_name, init_logit_scale=1 / 0.07, device=device)
    model.train()
    cfg = model_config(model_name)
    embed_dim = cfg["embed_dim"]
    size = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    vocab = cfg["text_cfg"].get("vocab_size", 49408)
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, vocab, (batch, ctx), device=device)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    contenders = {}
    for name, method, t_online in (("clip", "clip", 1), ("amorlip-t1", "amorlip", 1), ("amorlip-t8", "amorlip", 8)):
        task = build_task(run_config(method, batch, t_online), model, embed_dim, device)
        task.start_epoch(1, 1000)  # steady state: beta > 0, previous-epoch net in use
        contenders[name] = Contender(name, task, optimizer, images, texts, device, dtype)
    contenders["open_clip"] = Contender("open_clip", OpenClipTask(model), optimizer, images, texts, device, dtype)
    for c in contenders.values():
        c.block()  # warm-up: kernels, allocator, cuBLAS workspaces
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, c in contenders.items():
            times[name] += c()
        log.info("batch %d round %d/%d: %s", batch, r + 1, rounds,
                 ", ".join(f"{n} {v[-1] * 1e3:.1f} ms" for n, v in times.items()))
    flops = {name: count_flops(c.block) / BLOCK for name, c in contenders.items()}
    out = {}
    base = spread(times["clip"])["median"]
    for name, c in contenders.items():
        stats = spread(times[name])
        out[name] = {"step_s": stats, "steps_per_s": 1.0 / stats["median"], "ratio_vs_clip": stats["median"] / base,
                     "peak_mem_gib": c.peak_bytes / 2**30 if c.peak_bytes else None,
                     "flops_per_step": flops[name], "achieved_tflops": flops[name] / stats["median"] / 1e12}
    del contenders, optimizer, model, images, texts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, fp32, amorlip-tiny, batch 8, 1 round (smoke test)")
    parser.add_argument("--model", default=None, help="open_clip model (default ViT-B-32; tiny amorlip-tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1024 2048; tiny 8")
    parser.add_argument("--rounds", type=int, default=None, help="timed blocks per contender (default 5; tiny 1)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or None,
                        help="where gpu.json goes (default $OUT, else benchmarks/results)")
    args = parser.parse_args(argv)
    setup_logging()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        log.warning("no CUDA device: running the full benchmark on CPU in fp32 (slow; use --tiny to smoke-test)")
    dtype = torch.bfloat16 if cuda else None
    model = args.model or ("amorlip-tiny" if args.tiny else "ViT-B-32")
    batches = args.batch_sizes or ([8] if args.tiny else [1024, 2048])
    rounds = args.rounds or (1 if args.tiny else 5)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_rate(n=256 if args.tiny else 8192, repeats=2 if args.tiny else 5,
                       min_seconds=0.05 if args.tiny else 0.5, dtype=torch.bfloat16 if cuda else torch.float32,
                       device=device)
    results = {}
    rows = []
    for batch in batches:
        res = bench_batch(model, batch, rounds, device, dtype)
        results[str(batch)] = res
        for name, r in res.items():
            rows.append([batch, name, r["step_s"]["median"] * 1e3, r["steps_per_s"], f"{r['ratio_vs_clip']:.4f}",
                         f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-",
                         r["flops_per_step"] / 1e12, r["achieved_tflops"],
                         f"{r['achieved_tflops'] * 1e3 / peak['gflops_best']:.1%}"])
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print_table(f"GPU step: {model}, {'bf16 autocast' if cuda else 'fp32'}, synthetic data, {where} "
                f"({rounds} blocks of {BLOCK} steps, alternating)",
                ["batch", "contender", "median ms", "steps/s", "ratio", "peak GiB", "TFLOP/step", "TFLOP/s",
                 "of matmul peak"], rows)
    goals = {}
    for batch, res in results.items():
        r8 = res["amorlip-t8"]["ratio_vs_clip"]
        goals[batch] = {"ratio_t8": r8, "met": r8 <= GOAL_RATIO_T8}
        print(f"batch {batch}: AmorLIP(T_online=8)/CLIP = {r8:.4f} (goal <= {GOAL_RATIO_T8}: {goal(r8 <= GOAL_RATIO_T8)}); "
              f"T_online=1: {res['amorlip-t1']['ratio_vs_clip']:.4f}; open_clip ClipLoss/ours: "
              f"{res['open_clip']['ratio_vs_clip']:.4f}")
    print(f"{'bf16' if cuda else 'fp32'} matmul peak ({peak['n']}x{peak['n']}): {peak['gflops_best']:.4g} GFLOP/s")
    payload = {"tiny": args.tiny, "model": model, "device": where, "precision": "bf16" if cuda else "fp32",
               "block_steps": BLOCK, "rounds": rounds, "results": results, "matmul": peak, "goals": goals}
    write_result("gpu" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()

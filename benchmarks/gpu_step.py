"""GPU step benchmark: the trainer's step on bf16 ViT-B-32, CLIP vs AmorLIP vs open_clip's ClipLoss.

Run by ``benchmarks/gpu.sh`` on one GPU (no internet; well under 10 minutes). For batch 1024 and
2048 it times, on one shared ViT-B-32 (random init; weights' values do not change the time):

- ``clip``: our :class:`amorlip.tasks.ClipTask` step;
- ``amorlip-t1`` / ``amorlip-t8``: our :class:`amorlip.tasks.AmorlipTask` step with T_online 1 and 8
  (steady state: epoch 1, beta > 0, paper Table 2: +4.47 % / +2.16 % on one H100);
- ``open_clip``: open_clip's own ``ClipLoss`` on the same model outputs (the reference CLIP step).

The step is the trainer's, with training's settings: the model's 0-dim parameters made 1-element
(``scalar_params_to_1d``), the trainer's AdamW groups (``param_groups`` / ``make_optimizer``), and
:meth:`Contender.step`: forward, backward, clip at ``run.grad_clip``, AdamW, logit-scale clamp. On
a GPU, bf16 autocast covers the towers only, exactly where DeepSpeed's ``torch_autocast`` puts it
(around the engine's forward, :class:`AutocastTowers`): logits, losses and the lambda nets run in
fp32 outside it. TF32 stays as training leaves it (off: the trainer does not enable it). What is
left out: DeepSpeed's wrapper (on one GPU, ZeRO-1 has nothing to shard or reduce), the loader
(images and tokens are synthetic and already on the device) and the trainer's one flag read per
step, so the figures are the step's compute.

Contenders alternate in blocks of 8 steps (one T_online = 8 period) after a warm-up block; reported:
median steps/s, ratio to our CLIP step, peak memory (``torch.cuda.max_memory_allocated`` during
the contender's blocks; the model is shared, so the difference between contenders is the method's
own), FLOPs per step (FlopCounterMode), achieved TFLOP/s, **MFU** (achieved / the device's
datasheet dense bf16 peak, :data:`DATASHEET_BF16_DENSE_TFLOPS`) and, beside it, the share of a
measured bf16 matmul rate (what this GPU reaches on one large matmul, under its clocks and power
limit). The script needs torch, open_clip, jsonschema and PyYAML, not DeepSpeed.

``--tiny`` runs the same code on CPU (fp32, amorlip-tiny model, batch 8) for the smoke test.

    python -m benchmarks.gpu_step [--tiny] [--batch-sizes 1024 2048] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torch import nn

from benchmarks.common import goal, print_table, setup_logging, spread, write_result
from benchmarks.flops import count_flops, matmul_rate

log = logging.getLogger(__name__)

BLOCK = 8
GOAL_RATIO_T8 = 1.03

# NVIDIA datasheet dense BF16 tensor-core peaks in TFLOP/s (the datasheets print twice these
# "with sparsity"). H200 SXM shares H100 SXM's compute (it differs in memory); NVL boards run at a
# lower power limit. A100's figure holds for its SXM and PCIe boards.
DATASHEET_BF16_DENSE_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.5,
    "H200": 989.4,
    "H200 NVL": 835.5,
    "GH200": 989.4,
    "A100": 312.0,
}


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    """``(table key, dense bf16 TFLOP/s)`` for a ``torch.cuda.get_device_name()``, None if unknown.

    Names as CUDA reports them: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
    "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100 80GB PCIe". An unknown device gets no MFU rather than a guessed one.
    """
    name = device_name.upper().replace("-", " ")
    words = name.split()
    if "GH200" in name:
        key = "GH200"
    elif "H200" in words:
        key = "H200 NVL" if "NVL" in words else "H200"
    elif "H100" in words:
        key = "H100 PCIe" if "PCIE" in words else "H100 NVL" if "NVL" in words else "H100 SXM"
    elif "A100" in words:
        key = "A100"
    else:
        return None
    return key, DATASHEET_BF16_DENSE_TFLOPS[key]


def mfu(flops_per_step: float, step_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak)."""
    if not peak_tflops or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tflops * 1e12)


class AutocastTowers(nn.Module):
    """The model under ``torch.autocast`` for its forward only, as DeepSpeed's ``torch_autocast``
    wraps the engine's forward: whatever the task computes from the outputs (logits, losses, the
    lambda nets) runs outside, in fp32. Parameter names gain a ``module.`` prefix, as in the engine."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


def run_config(method: str, batch: int, t_online: int = 1):
    """A RunConfig with the schema's defaults (the large-scale settings) for the synthetic benchmark."""
    from amorlip.config import expand_runs, load_config

    override = {"method": method, "batch_size": batch, "epochs": 32, "warmup_steps": 0}
    if method == "amorlip":
        override["amorlip"] = {"t_online": t_online}
    config = load_config({"runs": {"bench": override}}, check_paths=False)
    return expand_runs(config)["bench"]


def open_clip_task(run, model, embed_dim: int, device):
    """open_clip's ClipLoss in our CLIP task's place (the reference CLIP step).

    Everything but the loss is the task's own (step, clip, clamp); the loss sees fp32 features and
    scale, as ours does, so the comparison is between the two loss implementations.
    """
    from open_clip.loss import ClipLoss

    from amorlip.objectives.clip import as_fp32_scale
    from amorlip.tasks import ClipTask

    class OpenClipTask(ClipTask):
        method = "open_clip"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss = ClipLoss()

        def training_forward(self, images, texts, step_in_epoch: int) -> dict:
            out = self._features(images, texts)
            img, txt = out["image_features"].float(), out["text_features"].float()
            return {"loss": self.loss(img, txt, as_fp32_scale(out["logit_scale"], img.device))}

    return OpenClipTask(run, model)


class Contender:
    """One method's step on the shared model; ``__call__`` times a block and returns s/step."""

    def __init__(self, name, task, optimizer, images, texts, device):
        self.name, self.task, self.optimizer = name, task, optimizer
        self.images, self.texts, self.device = images, texts, device
        self.step_in_epoch = 0
        self.peak_bytes = 0

    def step(self) -> None:
        """The trainer's step in plain torch: the task's forward (autocast inside the wrapped model),
        backward, clip, AdamW, clamp (what amorlip.train.step.encoder_step asks of DeepSpeed)."""
        from amorlip.objectives.temperature import clamp_logit_scale_

        task, run = self.task, self.task.run
        out = task.training_forward(self.images, self.texts, self.step_in_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if run.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(task.model.parameters(), run.grad_clip)
        self.optimizer.step()
        clamp_logit_scale_(task.model, run.max_logit_scale)
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


def bench_batch(model_name: str, batch: int, rounds: int, device: torch.device, dtype,
                peak_tflops: float | None = None) -> dict:
    """All contenders at one batch size on one shared model; returns per-contender figures."""
    from amorlip.models import create_model, model_config
    from amorlip.tasks import build_task
    from amorlip.train.engine import make_optimizer, param_groups, scalar_params_to_1d

    torch.manual_seed(0)
    model, _, _ = create_model(model_name, init_logit_scale=1 / 0.07, device=device)
    model.train()
    scalar_params_to_1d(model)  # what build_engine does before DeepSpeed sees the model
    cfg = model_config(model_name)
    embed_dim = cfg["embed_dim"]
    size = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    vocab = cfg["text_cfg"].get("vocab_size", 49408)
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, vocab, (batch, ctx), device=device)
    towers = AutocastTowers(model, device.type, dtype) if dtype is not None else model
    optimizer = make_optimizer(param_groups(model, run_config("clip", batch)), run_config("clip", batch), device)
    contenders = {}
    for name, method, t_online in (("clip", "clip", 1), ("amorlip-t1", "amorlip", 1), ("amorlip-t8", "amorlip", 8)):
        task = build_task(run_config(method, batch, t_online), model, embed_dim, device)
        task.model = towers  # as the trainer swaps in the engine
        task.start_epoch(1, 1000)  # steady state: beta > 0, previous-epoch net in use
        contenders[name] = Contender(name, task, optimizer, images, texts, device)
    reference = open_clip_task(run_config("clip", batch), model, embed_dim, device)
    reference.model = towers
    contenders["open_clip"] = Contender("open_clip", reference, optimizer, images, texts, device)
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
                     "flops_per_step": flops[name], "achieved_tflops": flops[name] / stats["median"] / 1e12,
                     "mfu": mfu(flops[name], stats["median"], peak_tflops)}
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
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    datasheet = datasheet_peak(where) if cuda else None
    if cuda and datasheet is None:
        log.warning("%s is not in the datasheet table: no MFU, only the share of the measured matmul rate", where)
    peak = matmul_rate(n=256 if args.tiny else 8192, repeats=2 if args.tiny else 5,
                       min_seconds=0.05 if args.tiny else 0.5, dtype=torch.bfloat16 if cuda else torch.float32,
                       device=device)
    results = {}
    rows = []
    for batch in batches:
        res = bench_batch(model, batch, rounds, device, dtype, datasheet[1] if datasheet else None)
        results[str(batch)] = res
        for name, r in res.items():
            r["of_measured_matmul"] = r["achieved_tflops"] * 1e3 / peak["gflops_best"]
            rows.append([batch, name, r["step_s"]["median"] * 1e3, r["steps_per_s"], f"{r['ratio_vs_clip']:.4f}",
                         f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-",
                         r["flops_per_step"] / 1e12, r["achieved_tflops"],
                         f"{r['mfu']:.1%}" if r["mfu"] is not None else "-", f"{r['of_measured_matmul']:.1%}"])
    print_table(f"GPU step: {model}, {'bf16 autocast on the towers' if cuda else 'fp32'}, synthetic data, {where} "
                f"({rounds} blocks of {BLOCK} steps, alternating)",
                ["batch", "contender", "median ms", "steps/s", "ratio", "peak GiB", "TFLOP/step", "TFLOP/s",
                 "MFU", "of measured matmul"], rows)
    goals = {}
    for batch, res in results.items():
        r8 = res["amorlip-t8"]["ratio_vs_clip"]
        goals[batch] = {"ratio_t8": r8, "met": r8 <= GOAL_RATIO_T8}
        print(f"batch {batch}: AmorLIP(T_online=8)/CLIP = {r8:.4f} (goal <= {GOAL_RATIO_T8}: {goal(r8 <= GOAL_RATIO_T8)}); "
              f"T_online=1: {res['amorlip-t1']['ratio_vs_clip']:.4f}; open_clip ClipLoss/ours: "
              f"{res['open_clip']['ratio_vs_clip']:.4f}")
    print(f"measured {'bf16' if cuda else 'fp32'} matmul ({peak['n']}x{peak['n']}): {peak['gflops_best']:.4g} GFLOP/s"
          + (f"; datasheet dense bf16 peak ({datasheet[0]}): {datasheet[1]:.4g} TFLOP/s" if datasheet else ""))
    payload = {"tiny": args.tiny, "model": model, "device": where,
               "precision": "bf16 autocast (towers)" if cuda else "fp32", "tf32": torch.backends.cuda.matmul.allow_tf32,
               "block_steps": BLOCK, "rounds": rounds, "results": results, "matmul": peak,
               "datasheet": {"name": datasheet[0], "bf16_dense_tflops": datasheet[1]} if datasheet else None,
               "goals": goals}
    write_result("gpu" + ("_tiny" if args.tiny else ""), payload, args.out_dir)
    return payload


if __name__ == "__main__":
    main()

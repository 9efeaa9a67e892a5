"""The training step reads the device at most once (GPU readiness).

On a GPU every ``Tensor.item()``, ``float(t)``, ``bool(t)`` or ``t.tolist()`` of a device tensor
waits for every queued kernel: a step with a dozen of them, several before backward, runs the GPU
in lock step with Python. The trainer keeps metrics as device tensors and reads one reduced flag
vector per step; this test counts host reads over several non-logging steps of the real
``Trainer`` (real DeepSpeed engine, real AmorLIP task, ZeRO-1) and holds it to one per step. The
count is taken on CPU tensors, where the same calls would synchronise on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_world_equivalence import EPOCHS, STEPS_PER_EPOCH, RankSlices, global_batches, run_config

from amorlip.distributed import free_port

READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")
STEPS = 4


PACKAGE = Path(__file__).resolve().parents[1] / "amorlip"


class ReadCounter:
    """Wraps the Tensor methods that copy a value to the host; counts the calls made by amorlip's code.

    Reads inside libraries are listed apart (``other``): torch's Adam reads its step counters, which
    live on the CPU even for GPU parameters (no sync), and DeepSpeed's ZeRO 1/2 optimizer checks its
    gradient norm for inf/NaN on every step (a sync this project cannot remove; docs/slurm.md).
    """

    def __init__(self) -> None:
        self.count = 0
        self.where: list[str] = []
        self.other: list[str] = []
        self._saved = {}

    def __enter__(self):
        import traceback

        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(tensor, *args, __original=original, __name=name, **kwargs):
                frame = traceback.extract_stack(limit=2)[0]  # the caller of the read
                where = f"{__name} at {frame.filename}:{frame.lineno}"
                if Path(frame.filename).resolve().is_relative_to(PACKAGE):
                    self.count += 1
                    self.where.append(where)
                else:
                    self.other.append(where)
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _worker(rank: int, port: int, out: str, method: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from amorlip import distributed as dist_utils
    from amorlip.tracking import Tracker
    from amorlip.train.loop import StopSignal, Trainer
    from amorlip.train.progress import Throughput
    from amorlip.train.run import build_model_engine_task

    name = {"amorlip": "amorlip-published", "clip": "clip", "fastclip": "fastclip-v3"}[method]
    # no logging step, no checkpoint inside the window; lr_logit_scale_thresh on (it reads s from the flags)
    run = run_config(name, 1, log_every=1000, checkpoint_every=1000, lr_logit_scale=1e-4, lr_logit_scale_thresh=0.03)
    world = dist_utils.make_world(run.batch_size, run.world_size)
    try:
        engine, task, _, _ = build_model_engine_task(run, world)
        trainer = Trainer(run=run, engine=engine, task=task,
                          loader=RankSlices(world, global_batches(EPOCHS * STEPS_PER_EPOCH)),
                          run_dir=Path(out) / method, world=world,
                          tracker=Tracker("sqlite:///unused.db", Path(out) / "off.jsonl", enabled=False),
                          stop=StopSignal())
        trainer.total_steps = 1000  # no step is the last one (which always logs)
        task.start_epoch(0, len(trainer.loader))
        batches = list(trainer.loader.epoch(0)) + list(trainer.loader.epoch(1))
        speed = Throughput(trainer.global_batch)
        trainer._after_step(trainer._step(batches[0]), speed)  # warm-up step (lazy optimizer state)
        with ReadCounter() as counter:
            for batch in batches[1:STEPS]:
                out_ = trainer._step(batch)
                trainer._after_step(out_, speed)
        Path(out, f"{method}.txt").write_text(f"{counter.count}\n" + "\n".join(counter.where))
    finally:
        dist_utils.shutdown()


@pytest.mark.dist
@pytest.mark.parametrize("method", ["amorlip", "clip", "fastclip"])
def test_at_most_one_host_read_per_non_logging_step(tmp_path, method):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path), method), nprocs=1, join=True,
                       start_method="spawn")
    count, *where = (tmp_path / f"{method}.txt").read_text().splitlines()
    steps = STEPS - 1
    assert int(count) <= steps, f"{count} host reads in {steps} steps:\n" + "\n".join(where)

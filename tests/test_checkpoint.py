"""amorlip.train.checkpoint: completion markers, pruning, RNG state and the files' digests.

The DeepSpeed save/load itself is exercised end to end by tests/test_train.py (kill -9, SIGTERM).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from amorlip.train import checkpoint as ckpt


def _tag(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.COMPLETE_MARKER).write_text("{}")
    return d


def test_only_marked_tags_count_and_newest_wins(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False), (3, False)):
        _tag(tmp_path, step, complete)
    (tmp_path / "latest").write_text("step-0000015")  # DeepSpeed's pointer is never trusted
    (tmp_path / "not-a-tag").mkdir()
    assert ckpt.complete_tags(tmp_path) == ["step-0000005", "step-0000010"]
    assert ckpt.latest_complete_tag(tmp_path) == "step-0000010"
    assert ckpt.torn_tags(tmp_path) == ["step-0000003", "step-0000015"]
    assert ckpt.latest_complete_tag(tmp_path / "missing") is None


def test_prune_keeps_the_newest_complete_and_newer_torn(tmp_path):
    for step in (5, 10, 15, 20):
        _tag(tmp_path, step)
    _tag(tmp_path, 7, complete=False)
    _tag(tmp_path, 25, complete=False)  # may be a save in progress: never removed
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step-0000005", "step-0000007", "step-0000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000015", "step-0000020", "step-0000025"]


def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# --------------------------------------------------------------------------- file digests in the marker

# A real DeepSpeed ZeRO-1 save and resume of a tiny module, in a child process (the process group and
# DeepSpeed's globals stay out of the test process). After a clean resume, the optimizer shard (which
# DeepSpeed unpickles with weights_only=False) is replaced by a pickle that creates a folder when
# loaded: the resume must refuse it, naming the file, before anything unpickles it.
_SAVE_TAMPER_RESUME = """
import json, os, pickle, sys
from pathlib import Path
import torch
from amorlip.distributed import init_distributed
from amorlip.train import checkpoint as ckpt
init_distributed()
import deepspeed

class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), config={
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
engine.backward(engine(torch.ones(1, 4)).sum())
engine.step()
root = Path(sys.argv[1])
tag = ckpt.save_checkpoint(engine, root, 1, {"position": 7}, keep=2)
result = {"tag": tag, "resumed": ckpt.load_checkpoint(engine, root, tag)["position"]}
optim = next((root / tag).glob("*optim_states.pt"))
result["optim"] = optim.name
optim.write_bytes(pickle.dumps(Evil()))
try:
    ckpt.load_checkpoint(engine, root, tag)
    result["error"] = None
except ckpt.CheckpointIntegrityError as exc:
    result["error"] = str(exc)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-digests")
    pwned = root / "unpickled-code-ran"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-c", _SAVE_TAMPER_RESUME, str(root / "checkpoints"), str(pwned)],
                          env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root / "checkpoints", "pwned": pwned, **json.loads(lines[-1][len("RESULT "):])}


def test_resume_refuses_a_replaced_deepspeed_file_before_unpickling_it(tampered):
    assert tampered["resumed"] == 7, "an untouched checkpoint resumes"
    assert not tampered["pwned"].exists(), "the replaced optimizer file was unpickled"
    error = tampered["error"]
    assert error is not None, "the replaced optimizer file was accepted"
    assert tampered["optim"] in error and "changed after the checkpoint was saved" in error
    assert "previous complete checkpoint" in error  # the fix


def test_files_added_removed_or_unrecorded_are_refused_by_name(tampered, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(tampered["root"], root)
    tag_dir = root / tampered["tag"]
    tag = tag_dir.name
    marker = json.loads((tag_dir / ckpt.COMPLETE_MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in tag_dir.iterdir()} - {ckpt.COMPLETE_MARKER}
    # drop the replaced shard from the tag and its marker: what is left verifies
    del marker["files"][tampered["optim"]]
    (tag_dir / tampered["optim"]).unlink()
    (tag_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    ckpt.verify_checkpoint(root, tag)

    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(ckpt.CheckpointIntegrityError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt was not written"):
        ckpt.verify_checkpoint(root, tag)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()

    (tag_dir / "rng-rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointIntegrityError, match="rng-rank0.pt is missing"):
        ckpt.verify_checkpoint(root, tag)

    (tag_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))
    with pytest.raises(ckpt.CheckpointIntegrityError, match="records no file digests"):
        ckpt.verify_checkpoint(root, tag)

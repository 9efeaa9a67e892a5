"""``kill -9`` at five seeded points of a 24-step run, one of them inside a checkpoint write.

SIGKILL runs no handler: the job gets no chance to save or clean up, as with the OOM killer, a node
failure or ``scancel --signal=KILL``. Every restart must resume from the newest *complete* checkpoint
(a torn tag directory is ignored), and the run that finally completes must have consumed exactly the
samples of an uninterrupted run: same steps, same keys at every step, hence the same multiset of
samples per epoch. The per-step keys come from the trainer's ``AMORLIP_DEBUG_KEYS`` record.

The torn checkpoint is made deterministic with SIGSTOP: as soon as a new tag directory appears the
trainer is frozen, the test checks that its ``complete`` marker is not there yet, and only then
sends SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import torch

from amorlip.train import checkpoint as ckpt
from amorlip.train.export import client_state

from .conftest import (
    keys_per_epoch,
    read_jsonl,
    run_dir,
    steps_and_keys,
    train_job,
    wait_for,
    write_tiny_config,
)

SEED = 8
N_PLAIN_KILLS = 4  # + 1 inside a checkpoint write = 5 kills
TOTAL_STEPS = 24


def _records(keys: Path, pid: int) -> list[dict]:
    return [r for r in read_jsonl(f"{keys}.rank0.jsonl") if r.get("pid") == pid and "keys" in r]


def _resumed_from(log: str) -> str | None:
    m = re.search(r"resumed from (step-\d+)", log)
    return m.group(1) if m else None


def test_kill9_5_points_resume_exact(tmp_path, reference_run):
    config = write_tiny_config(tmp_path)
    ckpt_dir = run_dir(tmp_path) / "checkpoints"
    keys = tmp_path / "keys"
    rng = random.Random(SEED)
    plain = sorted(rng.sample(range(2, TOTAL_STEPS - 2), N_PLAIN_KILLS))
    torn_after = rng.randrange(1, N_PLAIN_KILLS)  # the checkpoint-write kill comes after this many plain ones
    plan: list[int | str] = plain[:torn_after] + ["checkpoint-write"] + plain[torn_after:]
    print(f"\nkill plan (seed {SEED}): {plan}")

    expected_resume: str | None = None
    restarts, torn_seen, torn_attempt, t0 = [], None, 0, time.monotonic()
    for attempt, point in enumerate(plan + ["finish"], start=1):
        log = tmp_path / f"attempt-{attempt}.log"
        job = train_job(config, "tiny-run", log, AMORLIP_DEBUG_KEYS=str(keys))
        if point == "finish":
            rc = job.wait(300)
            assert rc == 0, job.text()[-4000:]
        else:
            if point == "checkpoint-write":
                start_tags = set(os.listdir(ckpt_dir)) if ckpt_dir.exists() else set()

                def new_tag(start_tags=start_tags):
                    if not ckpt_dir.exists():
                        return None
                    fresh = [t for t in os.listdir(ckpt_dir) if ckpt.step_of(t) is not None and t not in start_tags]
                    return fresh[0] if fresh else None

                tag = wait_for(new_tag, 240, interval=0.005, what="a new checkpoint directory", proc=job.proc)
                job.signal(signal.SIGSTOP)  # freeze mid-write, then look
                caught_torn = not (ckpt_dir / tag / ckpt.COMPLETE_MARKER).exists()
                job.kill9()
                if caught_torn:
                    torn_seen, torn_attempt = tag, attempt
                print(f"attempt {attempt}: SIGKILL while writing {tag} (marker absent: {caught_torn})")
            else:
                wait_for(lambda point=point, job=job: any(r["step"] >= point for r in _records(keys, job.pid)),
                         240, interval=0.02, what=f"step {point}", proc=job.proc)
                job.kill9()
                print(f"attempt {attempt}: SIGKILL after step {point}")
        text = job.text()
        if torn_seen and attempt == torn_attempt + 1:  # the restart says which torn tag it ignored
            assert f"ignoring incomplete checkpoint(s) {torn_seen}" in text, text[-3000:]
        resumed = _resumed_from(text)
        mine = _records(keys, job.pid)
        # every restart resumes from the newest complete checkpoint at the time it started
        assert resumed == expected_resume, f"attempt {attempt} resumed from {resumed}, expected {expected_resume}"
        if mine:
            first = mine[0]["step"]
            assert first == (ckpt.step_of(expected_resume) if expected_resume else 0), (attempt, first)
        if attempt > 1:
            restarts.append((resumed, mine[0]["step"] if mine else None, mine[-1]["step"] if mine else None))
        expected_resume = ckpt.latest_complete_tag(ckpt_dir)
        if point == "checkpoint-write" and torn_seen:
            assert ckpt.latest_complete_tag(ckpt_dir) != torn_seen

    assert torn_seen is not None, "the SIGSTOP never caught a checkpoint before its marker"

    summary = json.loads((run_dir(tmp_path) / "train.json").read_text())
    ref = reference_run.get()
    records = read_jsonl(f"{keys}.rank0.jsonl")
    spe = summary["steps_per_epoch"]
    assert summary["steps"] == ref["summary"]["steps"] == TOTAL_STEPS
    assert summary["samples_seen"] == ref["summary"]["samples_seen"]
    # the same keys at every step, hence the same samples per epoch
    got, want = steps_and_keys(records), steps_and_keys(ref["records"])
    assert sorted(got) == list(range(TOTAL_STEPS))
    assert got == want
    assert keys_per_epoch(records, spe) == keys_per_epoch(ref["records"], spe)
    # a step trained twice (before a kill and after the restart) saw the same batch both times
    seen: dict[int, list[str]] = {}
    for rec in (r for r in records if "keys" in r):
        assert seen.setdefault(rec["step"], rec["keys"]) == rec["keys"], f"step {rec['step']} differs on replay"
    redone = sum(1 for r in records if "keys" in r) - TOTAL_STEPS
    ref_sha = next(r["weights_sha256"] for r in ref["records"] if "weights_sha256" in r)
    sha = [r["weights_sha256"] for r in records if "weights_sha256" in r][-1]
    # model, optimizer, lambda nets, RNG and data position all came back: not one bit differs
    assert sha == ref_sha, "final weights differ from the uninterrupted run's"
    print(f"kill -9 x {len(plan)}: {len(restarts)} restarts (resumed tag, first step, last step): {restarts}; "
          f"{redone} steps trained twice; final step {summary['steps']} = reference {ref['summary']['steps']}; "
          f"final weights bit-identical to the uninterrupted run's; {time.monotonic() - t0:.0f} s")


def _final_weights_and_u(root: Path, keys: Path) -> tuple[str, dict]:
    """The final weights' digest (AMORLIP_DEBUG_KEYS record) and the task state of the last checkpoint."""
    sha = [r["weights_sha256"] for r in read_jsonl(f"{keys}.rank0.jsonl") if "weights_sha256" in r][-1]
    ckpt_dir = run_dir(root) / "checkpoints"
    tag = ckpt.latest_complete_tag(ckpt_dir)
    assert ckpt.step_of(tag) == TOTAL_STEPS, tag
    return sha, client_state(ckpt_dir, tag)["task"]


def test_kill9_fastclip_mid_epoch_resumes_to_the_same_weights_and_u(tmp_path):
    """FastCLIP-v3 killed mid epoch 0 (u half filled, gamma 1) and mid epoch 1 (gamma < 1: u averaged)
    finishes with the uninterrupted run's weights and, bit for bit, its image and text u."""
    fastclip = {"method": "fastclip", "fastclip": {"gamma_min": 0.5, "gamma_decay_epochs": 1}}
    ref_root, root = tmp_path / "reference", tmp_path / "killed"
    ref_keys, keys = tmp_path / "ref-keys", tmp_path / "keys"
    ref_job = train_job(write_tiny_config(ref_root, run_overrides=fastclip), "tiny-run",
                        tmp_path / "reference.log", AMORLIP_DEBUG_KEYS=str(ref_keys))
    config = write_tiny_config(root, run_overrides=fastclip)
    plan = [7, 17]  # steps per epoch: 12; checkpoints every 5 steps, so each restart replays two steps
    for attempt, point in enumerate(plan + ["finish"], start=1):
        job = train_job(config, "tiny-run", tmp_path / f"attempt-{attempt}.log", AMORLIP_DEBUG_KEYS=str(keys))
        if point == "finish":
            assert job.wait(300) == 0, job.text()[-4000:]
            break
        wait_for(lambda point=point, job=job: any(r["step"] >= point for r in _records(keys, job.pid)),
                 240, interval=0.02, what=f"step {point}", proc=job.proc)
        job.kill9()
        if attempt > 1:
            assert _resumed_from(job.text()) is not None, job.text()[-3000:]
    assert ref_job.wait(300) == 0, ref_job.text()[-4000:]

    sha, state = _final_weights_and_u(root, keys)
    ref_sha, ref_state = _final_weights_and_u(ref_root, ref_keys)
    assert sha == ref_sha, "final weights differ from the uninterrupted FastCLIP run's"
    for name in ("log_u_img", "log_u_txt"):
        assert state[name].shape == ref_state[name].shape
        assert torch.isfinite(state[name]).all(), f"{name}: a sample was never visited"
        assert torch.equal(state[name], ref_state[name]), f"{name} differs from the uninterrupted run's"
    assert state["gamma"] == ref_state["gamma"] == 0.5

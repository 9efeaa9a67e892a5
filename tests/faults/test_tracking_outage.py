"""Tracking outage: the MLflow server dies mid-run and comes back; nothing is lost.

A real ``mlflow server`` (SQLite backend, 127.0.0.1) receives a 24-step run's metrics. After step 4
the server is killed (SIGKILL to its whole process group); the trainer's next call fails, it warns
once and keeps every later event in ``runs/{run}/mlflow-offline.jsonl``; training completes. The
server is started again on the same port and store, and ``amorlip mlflow replay FILE`` sends the kept
events into the same MLflow run. While both run, their listening sockets are checked: the server and
the trainer (its process group) must listen on the loopback interface only. Figures: the steps missing from the server's metric history before
the replay (the outage), and after it (none).
"""

from __future__ import annotations

import json

from amorlip.cli import main as cli_main

from .conftest import read_jsonl, run_dir, train_job, wait_for, write_tiny_config

TOTAL_STEPS = 24


def _listening(pids: list[int]) -> list[str]:
    """Addresses the processes listen on (the trainer's process group, gloo; the server's workers)."""
    import psutil

    out = set()
    for pid in pids:
        for c in psutil.Process(pid).net_connections("inet"):
            if c.status == psutil.CONN_LISTEN:
                out.add(f"{c.laddr.ip}:{c.laddr.port}")
    return sorted(out)


def test_mlflow_down_mid_run_replay_leaves_no_gap(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    server = mlflow_server.start()
    config = write_tiny_config(tmp_path, tracking_uri=server.uri)
    keys = tmp_path / "keys"
    job = train_job(config, "tiny-run", tmp_path / "train.log", AMORLIP_DEBUG_KEYS=str(keys))

    def step() -> int:
        return max((r["step"] for r in read_jsonl(f"{keys}.rank0.jsonl") if "keys" in r), default=-1)

    wait_for(lambda: step() >= 4, 240, interval=0.05, what="step 4", proc=job.proc)
    # while both run: every listening socket of the trainer and of the server is on loopback
    listening = {"trainer": _listening([job.pid]), "mlflow server": _listening(server.pids())}
    server.stop()
    down_at = step()
    # keep it down for a few steps (or until the run ends), then bring it back on the same port and store
    wait_for(lambda: step() >= down_at + 4 or job.proc.poll() is not None, 240, interval=0.05,
             what="steps during the outage")
    server.start()
    rc = job.wait(300)
    text = job.text()
    assert rc == 0, text[-3000:]
    assert "MLflow unreachable" in text and "amorlip mlflow replay" in text

    summary = json.loads((run_dir(tmp_path) / "train.json").read_text())
    run_id = summary["mlflow_run_id"]
    assert run_id, "the run was created before the outage and must keep its id"
    offline = run_dir(tmp_path) / "mlflow-offline.jsonl"
    kept = [e for e in read_jsonl(offline) if e["event"] == "metrics"]
    assert kept, "no metrics kept locally during the outage"

    client = MlflowClient(tracking_uri=server.uri)
    before = {m.step for m in client.get_metric_history(run_id, "loss")}
    gap = sorted(set(range(1, TOTAL_STEPS + 1)) - before)
    assert gap, "the outage should have left a gap on the server"

    assert cli_main(["mlflow", "replay", str(offline)]) == 0
    after = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert after == list(range(1, TOTAL_STEPS + 1)), f"metric history after replay: {after}"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not offline.exists() and offline.with_name(offline.name + ".replayed").exists()
    for who, addresses in listening.items():
        assert addresses and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "::1") for a in addresses), (who, addresses)
    print(f"\nlistening sockets (loopback only): {listening}")
    print(f"MLflow down after step {down_at + 1} (server restarted: {server.starts - 1}x): steps missing "
          f"on the server {gap[0]}..{gap[-1]} ({len(gap)}), kept locally {len(kept)} metric events; "
          f"after `amorlip mlflow replay`: {len(after)}/{TOTAL_STEPS} steps, no gap")

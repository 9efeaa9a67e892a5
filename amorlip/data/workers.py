"""img2dataset's shards in supervised worker processes: a dead worker stops the download naming it, a
signal stops it cleanly, and no child outlives it.

Why: img2dataset 1.47 hands shards to a ``multiprocessing.Pool``. When the kernel kills a worker
(the OOM killer), the pool starts a replacement but never reports the shard the dead worker held:
``imap_unordered`` waits for it forever (11 of 12 shards done, no message, still running). Its
Ctrl-C handler exits with status 0, so an interrupted download looks complete. And its children
outlive the parent: its logger process (a spawned process that imports all of img2dataset and polls
the output folder) loops until it is told to stop, so after SIGTERM or SIGKILL of ``amorlip download``
it runs on as an orphan of about 900 MB.

- :func:`supervised_distributor` has the signature of img2dataset's distributors. It starts
  ``processes`` spawned workers, each with its own pipe (no shared queue whose lock a killed worker
  could hold), hands one shard at a time to an idle worker and waits on the pipes and the process
  sentinels together: it knows at once which worker died, how (signal or exit status) and holding
  which shard, and raises :class:`WorkerDiedError` naming them. Workers are replaced after
  ``MAX_TASKS_PER_WORKER`` shards, as img2dataset's pool does (``maxtasksperchild=5``); a shard whose
  Downloader raised is retried ``max_shard_retry`` times, as img2dataset does. It logs each finished
  shard from its stats file, so img2dataset's logger process is replaced by :class:`InlineLogger`,
  which starts no process at all (one heavy process less per download, and no orphan to leave).
- Every worker first calls :func:`die_with_parent`: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so
  a SIGKILL of the parent takes its workers with it (elsewhere a thread polls ``getppid``). Workers
  ignore SIGINT: a Ctrl-C reaches the whole process group, and stopping is the parent's decision.
- :func:`stop_on_signals` turns SIGINT, SIGTERM and SIGHUP in the parent into :class:`Interrupted`
  (replacing img2dataset's exit-0 handler); :func:`stop_children` ends every child a download
  started, whatever way it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_TASKS_PER_WORKER = 5
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)
_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):  # noqa: N818 -- like KeyboardInterrupt: not an error of the code
    """A stop signal reached the download (a BaseException, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


class WorkerDiedError(RuntimeError):
    """A download worker ended without finishing its shard (killed by a signal, or crashed)."""

    def __init__(self, pid: int, exitcode: int | None, shard: int | None):
        self.pid, self.exitcode, self.shard = pid, exitcode, shard
        if exitcode is not None and exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
            if -exitcode == signal.SIGKILL:
                how += (" (the kernel's OOM killer sends SIGKILL when memory runs out: see `dmesg`; lower "
                        "datasets.<name>.threads or processes, or max_image_bytes)")
        else:
            how = f"exited with status {exitcode}"
        where = f"while downloading shard {shard:05d}" if shard is not None else "while idle"
        super().__init__(f"download worker process {pid} {how} {where}")


# --------------------------------------------------------------------------- children


def die_with_parent(parent_pid: int) -> None:
    """In a child: be killed when ``parent_pid`` dies, even by SIGKILL (no orphan keeps running)."""
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


class InlineLogger:
    """Stands in for img2dataset's ``LoggerProcess`` (same interface) without starting a process.

    :func:`supervised_distributor` logs each shard as it finishes; wandb logging is not used here.
    """

    def __init__(self, output_folder, enable_wandb, wandb_project, config_parameters, log_interval=5):  # noqa: ARG002
        if enable_wandb:
            raise ValueError("img2dataset's wandb logging is not supported by amorlip's download")
        self.output_folder = output_folder
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _worker_main(downloader, conn, parent_pid: int, max_tasks: int) -> None:
    """A worker: receive a shard, download it, send ``(shard_id, status)``; exit after ``max_tasks``."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for _ in range(max_tasks):
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        status, _ = downloader(task)
        conn.send((task[0], bool(status)))
    conn.close()


def stop_children(before: Iterable[int] = (), grace: float = 3.0) -> list[int]:
    """Terminate, then kill, every live multiprocessing child not in ``before``; return their pids."""
    before = set(before)
    children = [p for p in multiprocessing.active_children() if p.pid not in before]
    for p in children:
        with contextlib.suppress(OSError):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in children:
        # BaseProcess.join: img2dataset's LoggerProcess.join ignores its timeout and waits for a reply
        multiprocessing.process.BaseProcess.join(p, max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            multiprocessing.process.BaseProcess.join(p, 2)
    if children:
        log.info("stopped %d download child process(es): %s", len(children), [p.pid for p in children])
    return [p.pid for p in children]


# --------------------------------------------------------------------------- signals


def _raise_interrupted(signum, frame):  # noqa: ARG001 -- signal handler signature
    for s in STOP_SIGNALS:  # one is enough: cleanup is bounded, and SIGKILL still works
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread for the duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _reclaim_sigint() -> None:
    """img2dataset installs an exit-0 SIGINT handler inside its call: take SIGINT back while ours are active."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _raise_interrupted):
        signal.signal(signal.SIGINT, _raise_interrupted)


# --------------------------------------------------------------------------- distributor


def _log_shard(downloader, shard: int, finished: int) -> None:
    """One line per finished shard, from the stats file its worker wrote (what img2dataset's logger printed)."""
    try:
        digits = int(getattr(downloader, "oom_shard_count", 5))
        path = Path(downloader.output_folder) / f"{shard:0{digits}d}_stats.json"
        stats = json.loads(path.read_text())
        log.info("shard %05d done: %d/%d ok in %.1f s (%d shard(s) finished)", shard, stats["successes"],
                 stats["count"], stats["duration"], finished)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.info("shard %05d done (%d shard(s) finished)", shard, finished)


@dataclass
class _Worker:
    proc: multiprocessing.Process
    conn: multiprocessing.connection.Connection
    task: tuple | None = None
    done: int = 0


def supervised_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):  # noqa: ARG001
    """img2dataset's distributor interface: download every ``(shard_id, path)`` of ``reader``.

    Raises :class:`WorkerDiedError` as soon as a worker dies; shards whose Downloader raised are
    retried ``max_shard_retry`` times and then left out (the download's accounting names their urls).
    """
    _reclaim_sigint()
    ctx = multiprocessing.get_context("spawn")
    parent = os.getpid()
    source = iter(reader)
    retry: deque = deque()
    tries: dict[int, int] = {}
    workers: list[_Worker] = []
    finished, given_up = 0, []

    def next_task():
        return retry.popleft() if retry else next(source, None)

    def start() -> _Worker:
        mine, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(downloader, theirs, parent, MAX_TASKS_PER_WORKER),
                           name="amorlip-download-worker", daemon=True)
        proc.start()
        theirs.close()
        log.debug("download worker %d started", proc.pid)
        return _Worker(proc, mine)

    task = next_task()
    try:
        while task is not None or any(w.task is not None for w in workers):
            while task is not None:  # hand out shards to idle workers, starting workers as needed
                idle = next((w for w in workers if w.task is None), None)
                if idle is None and len(workers) < processes_count:
                    idle = start()
                    workers.append(idle)
                if idle is None:
                    break
                try:
                    idle.conn.send(task)
                except OSError:  # it died while idle: its pipe is closed
                    idle.proc.join(5)
                    raise WorkerDiedError(idle.proc.pid, idle.proc.exitcode, None) from None
                idle.task, task = task, next_task()
            multiprocessing.connection.wait([w.conn for w in workers] + [w.proc.sentinel for w in workers])
            for w in list(workers):
                if w.task is not None and w.conn.poll():
                    try:
                        shard, ok = w.conn.recv()
                    except (EOFError, OSError):
                        pass  # died while sending: handled below with its exit status
                    else:
                        row, w.task, w.done = w.task, None, w.done + 1
                        if ok:
                            finished += 1
                            _log_shard(downloader, shard, finished)
                        elif tries.get(shard, 0) < max_shard_retry:
                            tries[shard] = tries.get(shard, 0) + 1
                            log.warning("shard %05d failed; retry %d of %d", shard, tries[shard], max_shard_retry)
                            retry.append(row)
                            if task is None:
                                task = next_task()
                        else:
                            given_up.append(shard)
                            log.error("shard %05d failed %d time(s); giving up on it", shard, tries.get(shard, 0) + 1)
                        if w.done >= MAX_TASKS_PER_WORKER:  # it exits by itself; a fresh one replaces it
                            w.proc.join(10)
                            w.conn.close()
                            workers.remove(w)
                            continue
                if not w.proc.is_alive():
                    w.proc.join()
                    raise WorkerDiedError(w.proc.pid, w.proc.exitcode, w.task[0] if w.task else None)
    except BaseException:
        for w in workers:  # interrupted or a worker died: the others stop now
            with contextlib.suppress(OSError):
                w.proc.kill()
        raise
    else:
        for w in workers:  # all shards done: idle workers leave their loop
            with contextlib.suppress(OSError):
                w.conn.send(None)
    finally:
        for w in workers:
            w.proc.join(10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            w.conn.close()
    if given_up:
        log.error("%d shard(s) failed after %d retries: %s", len(given_up), max_shard_retry,
                  ", ".join(f"{s:05d}" for s in sorted(given_up)))


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """For the duration: img2dataset uses :func:`supervised_distributor` and :class:`InlineLogger`."""
    i2d_main = importlib.import_module("img2dataset.main")
    old = i2d_main.multiprocessing_distributor, i2d_main.LoggerProcess
    i2d_main.multiprocessing_distributor, i2d_main.LoggerProcess = supervised_distributor, InlineLogger
    try:
        yield
    finally:
        i2d_main.multiprocessing_distributor, i2d_main.LoggerProcess = old

"""System metrics (CPU, memory, disk, network, GPU where present) on a training run.

MLflow's own monitor (:class:`mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`,
psutil and, on NVIDIA machines, pynvml) samples in a daemon thread and logs ``system/...`` metrics
onto the run id it is given, through its own client. It never raises into the job: a store that stops
answering makes it log a warning and stop. Started only for a tracker that is online (an offline
run has no id to log onto, and the samples are not worth replaying).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class SystemMetrics:
    """``start()`` / ``stop()`` around a job; both are no-ops when it cannot run."""

    def __init__(self, tracker, interval_s: float = 10.0):
        self.tracker = tracker
        self.interval_s = float(interval_s)
        self._monitor = None

    def start(self) -> SystemMetrics:
        tracker = self.tracker
        if not tracker.enabled:
            return self
        if tracker.offline or not tracker.run_id:
            log.info("MLflow offline: no system metrics for this run")
            return self
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a resumed job continues the run's system-metric steps
            self._monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=self.interval_s,
                                                 resume_logging=True, tracking_uri=tracker.uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 -- monitoring must never kill the job
            log.warning("system metrics not recorded (%s: %s)", type(exc).__name__, exc)
            self._monitor = None
        return self

    def stop(self) -> None:
        """Log the samples still pending and stop the thread (before the run is ended)."""
        if self._monitor is None:
            return
        monitor, self._monitor = self._monitor, None
        try:
            monitor.finish()
            # the monitor publishes only after a full interval: one last sample, so that a job shorter
            # than the interval still shows its machine's load
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001
            log.warning("system metrics: %s: %s", type(exc).__name__, exc)

"""MLflow tracking: one parent run per pipeline, one child run per train / evaluate job.

One module per job:

- :mod:`.store`: the client (with a short HTTP retry policy), artifact location, the experiment;
- :mod:`.batching`: params / metrics / tags in MLflow's batch sizes (live tracker and replay);
- :mod:`.tags`: the tags every run carries (kind, Snakemake rule, git commit, SLURM job);
- :mod:`.tracker`: :class:`Tracker`, one run that survives an unreachable store (offline JSONL);
- :mod:`.datasets`, :mod:`.logged_models`, :mod:`.system_metrics`: dataset inputs, the exported
  model as a loadable (and registrable) logged model, CPU/memory/GPU figures;
- :mod:`.runs`: child runs of the pipeline, logging onto a finished training run;
- :mod:`.pipeline`: the parent run (created by ``amorlip mlflow init``, ended by the report);
- :mod:`.replay`: ``amorlip mlflow replay`` of an offline record.

The names below are the package's public interface (cli, train, evaluate, report and tests use them).
"""

from amorlip.tracking.batching import flatten
from amorlip.tracking.datasets import manifest_dataset
from amorlip.tracking.pipeline import PARENT_FILE, init_pipeline, log_to_parent, parent_run_name, read_parent
from amorlip.tracking.runs import attach_run, child_run, train_run_id, training_run_name
from amorlip.tracking.store import EXPERIMENT_KIND, ensure_experiment, mlflow_client, store_artifact_location
from amorlip.tracking.tracker import Tracker

__all__ = [
    "EXPERIMENT_KIND", "PARENT_FILE", "Tracker", "attach_run", "child_run", "ensure_experiment", "flatten",
    "init_pipeline", "log_to_parent", "manifest_dataset", "mlflow_client", "parent_run_name", "read_parent",
    "store_artifact_location", "train_run_id", "training_run_name",
]

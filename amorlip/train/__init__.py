"""Training: DeepSpeed engine (``engine``), the step loop (``loop``), checkpoints with completion
markers (``checkpoint``), the job entry point ``run.train`` (``amorlip train``), progress records
(``progress``) and the export to a plain open_clip ``model.pt`` (``export``)."""

"""Zero-shot evaluation: suites (``suites``), metric functions on clip_benchmark (``zeroshot``), the
per-run evaluator (``runner``) and the DataComp eval-set downloader (``download``).

Kept import-light on purpose: ``amorlip evalsets download`` must not pay for clip_benchmark.
"""

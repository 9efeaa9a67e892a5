"""``python -m benchmarks.open_clip_launcher ARGS``: open_clip_train.main with amorlip's model configs.

open_clip_train only accepts ``--model amorlip-demo`` when that config is in open_clip's registry;
the registry lives in the process, so this launcher registers the project's JSON configs
(``amorlip.models.register_model_configs``) and then hands the arguments to open_clip's own ``main``
unchanged. Nothing of open_clip's training code is replaced.
"""

from __future__ import annotations

import sys


def _skip_end_of_shard_markers() -> None:
    import open_clip_train.data as oc_data

    group = oc_data.group_by_keys_nothrow
    if getattr(group, "_amorlip_eof_safe", False):
        return

    def group_by_keys_nothrow(data, *args, **kwargs):
        return group((s for s in data if "fname" in s), *args, **kwargs)

    group_by_keys_nothrow._amorlip_eof_safe = True
    oc_data.group_by_keys_nothrow = group_by_keys_nothrow


def main(argv: list[str] | None = None) -> None:
    from amorlip.models import register_model_configs

    register_model_configs()
    _skip_end_of_shard_markers()
    from open_clip_train.main import main as open_clip_main

    open_clip_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

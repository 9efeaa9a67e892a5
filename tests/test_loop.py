"""amorlip.train.loop's parts that run without a process group (the loop itself: tests/test_train.py,
tests/test_host_syncs.py, tests/test_world_equivalence.py)."""

from __future__ import annotations

import torch


def test_metric_window_averages_each_key_over_the_steps_that_produced_it():
    from amorlip.distributed import WorldInfo
    from amorlip.train.loop import MetricWindow

    world = WorldInfo(rank=0, local_rank=0, world_size=1, group=None, device=torch.device("cpu"),
                      global_batch=4, local_batch=4)
    window = MetricWindow()
    window.add({"loss": torch.tensor(1.0), "gap": torch.tensor(10.0), "n": 3, "lr": 0.1})
    window.add({"loss": torch.tensor(3.0), "n": 5})
    window.add({"loss": torch.tensor(5.0), "gap": torch.tensor(20.0), "rare": 7.0})
    means, skipped = window.reduce(world, 2)
    assert means == {"loss": 3.0, "gap": 15.0, "n": 4.0, "rare": 7.0} and skipped == 2
    window.add({"loss": torch.tensor(2.0)})
    assert window.reduce(world, 0) == ({"loss": 2.0}, 0)  # emptied after each reduce

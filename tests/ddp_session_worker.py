"""One rank of a 2-process gloo session doing what the trainer's ranks do: on_main, gather, sum_values, then leave.

Started by tests/test_ddp.py through torchrun; it ends only if leaving the session cannot deadlock (B42).
"""

import os
import sys
from types import SimpleNamespace

import torch

from cogumi.train import distributed

runtime = SimpleNamespace(world_size=int(os.environ["WORLD_SIZE"]), device=torch.device("cpu"),
                          is_main=os.environ["RANK"] == "0")
with distributed.session(runtime):
    for i in range(int(sys.argv[1])):
        assert distributed.on_main(lambda i=i: {"step": i, "rank": os.environ["RANK"]}) == {"step": i, "rank": "0"}
        assert distributed.gather(i * 10 + int(os.environ["RANK"])) == [i * 10, i * 10 + 1]
        assert distributed.sum_values([1.0, float(i)], torch.device("cpu")) == [2.0, 2.0 * i]
print("left the session", flush=True)

"""Run under torchrun by tests/test_methods_distributed.py: score several methods in one launch.

``--late-rank R`` makes rank R slow to open the shard plan (by 3 s), so the other rank has
finished its own shard before R looks at the plan: a rank that listed the missing shards itself
then got a shifted list and left a shard unscored (seen once in CI, with a fast method).

``--die-rank R`` makes rank R exit just before it would finish its first shard (the test's way of
killing a rank mid-run without a hook in the product code). It first waits until every other shard
is written: torchrun stops the surviving ranks as soon as one dies, so without the wait whether
they finished their own shard would be a race.
"""
import argparse
import json
import os
import time

from cinf_core.methods.runner import ScoreConfig, score
from cinf_core.methods.shards import ShardPlan

parser = argparse.ArgumentParser()
parser.add_argument("workspace")
parser.add_argument("--methods", nargs="+", required=True)
parser.add_argument("--trait", default="evil")
parser.add_argument("--dataset", default="train")
parser.add_argument("--die-rank", type=int, default=-1)
parser.add_argument("--late-rank", type=int, default=-1)
args = parser.parse_args()

if int(os.environ["RANK"]) == args.late_rank:
    _open = ShardPlan.open.__func__

    def late_open(cls, *a, **k):
        time.sleep(3)
        return _open(cls, *a, **k)

    ShardPlan.open = classmethod(late_open)

if int(os.environ["RANK"]) == args.die_rank:
    def die(self, shard, *a, **k):
        deadline = time.monotonic() + 300
        others = [s for s in range(self.n_shards) if s != shard]
        while time.monotonic() < deadline and not all(self._parquet(s).exists() for s in others):
            time.sleep(0.2)
        os._exit(3)

    ShardPlan.finish = die

for method in args.methods:
    out = score(args.workspace, ScoreConfig(method=method, trait=args.trait, batch_size=8,
                                                 dataset=args.dataset))
    print(json.dumps(out, default=str), flush=True)

"""Run under torchrun by tests/test_methods_distributed.py: score several methods in one launch.

``--die-rank R`` makes rank R exit just before it would finish its first shard (the test's way of
killing a rank mid-run without a hook in the product code).
"""
import argparse
import json
import os

from cinf_core.methods.runner import ScoreConfig, score
from cinf_core.methods.shards import ShardPlan

parser = argparse.ArgumentParser()
parser.add_argument("workspace")
parser.add_argument("--methods", nargs="+", required=True)
parser.add_argument("--trait", default="evil")
parser.add_argument("--dataset", default="train")
parser.add_argument("--die-rank", type=int, default=-1)
args = parser.parse_args()

if int(os.environ["RANK"]) == args.die_rank:
    def die(self, *a, **k):
        os._exit(3)

    ShardPlan.finish = die

for method in args.methods:
    out = score(args.workspace, ScoreConfig(method=method, trait=args.trait, batch_size=8,
                                                 dataset=args.dataset))
    print(json.dumps(out, default=str), flush=True)

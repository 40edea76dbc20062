"""``python -m cinf_core ...`` for tests/test_faults.py: stores scores after every few examples and
says when it has claimed its run and each time it has stored scores.

The runner stores scores at most every ``FLUSH_S`` seconds of work and Influence Function scores
128 examples per call: on the tests' tiny model a whole run is one write, so a kill would land
before it or after it and never between stored chunks. Here every chunk of 4 examples is stored
as soon as it is scored (Vector Filter's chunks are its batches: pass ``--batch-size``), and the
marks ``claimed``, ``stored`` and ``held`` (another process holds the run) (lines ``fault-driver: ...`` on stderr, or messages on a
multiprocessing connection) let a test kill the process at a chosen point without polling the
store. With ``FAULT_PAUSE_AFTER=N`` and ``FAULT_GATE=PATH`` in the environment the process holds
after its N-th store until PATH exists (a test fills the disk meanwhile). Nothing else changes: the command line is the CLI's.
"""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cinf_core import store  # noqa: E402
from cinf_core.cli import main  # noqa: E402
from cinf_core.methods import runner  # noqa: E402
from cinf_core.methods.builtin import InfluenceFunction  # noqa: E402

MARK = "fault-driver:"


def run(argv: list[str], marks=None) -> int:
    """``python -m cinf_core ARGV`` in this process, storing every chunk and marking progress on
    ``marks`` (a connection; stderr lines when None)."""
    def say(what: str) -> None:
        if marks is None:
            print(MARK, what, file=sys.stderr, flush=True)
        else:
            marks.send(what)

    claim, add_scores, begin_run = runner._claim, store.RunHandle.add_scores, store.Store.begin_run
    held = [False]

    def begun(*args, **kwargs):  # "held" once: another live process holds the run; we wait
        handle = begin_run(*args, **kwargs)
        if handle.held_by is not None and not held[0]:
            held[0] = True
            say("held")
        return handle

    def claimed(*args, **kwargs):
        handle, waited_for = claim(*args, **kwargs)
        say("claimed")
        return handle, waited_for

    pause_after, gate = int(os.environ.get("FAULT_PAUSE_AFTER", "0")), os.environ.get("FAULT_GATE")
    n_stored = [0]

    def stored(self, indices, scores):
        add_scores(self, indices, scores)
        say("stored")
        n_stored[0] += 1
        if gate and n_stored[0] == pause_after:  # hold here until the test has set the scene
            deadline = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)

    runner.FLUSH_S = 0.0
    InfluenceFunction.chunk = 4
    runner._claim = claimed
    store.Store.begin_run = begun
    store.RunHandle.add_scores = stored
    os.environ.setdefault("CINF_THREADS", "1")
    return main(argv)


def run_and_exit(argv: list[str], marks=None) -> None:
    """:func:`run` as a process's whole life (a multiprocessing target)."""
    sys.exit(run(argv, marks))


if __name__ == "__main__":
    run_and_exit(sys.argv[1:])

"""The names of the ``python -m cinf_core`` subcommands.

The CLI defines each of them (``cli.command`` refuses a name missing here); background jobs start
them by name and check a job's command against this list without importing the CLI.
"""

SUBCOMMANDS = (
    "demo", "app", "add-dataset", "add-model", "finetune", "set-judge", "train-judge", "train-sae", "add-concept", "concepts", "datasets",
    "add-sae", "saes", "add-queries", "queries", "models", "runs", "export", "score", "merge",
    "evaluate", "results", "retrain", "features", "memory", "bench", "index",
)

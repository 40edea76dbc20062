"""Workspace paths: temporary files are each process's own and sit beside their target."""
import subprocess
import sys
from pathlib import Path

from cinf_core import paths


def test_temp_for_is_hidden_beside_its_target_and_differs_per_process(tmp_path):
    target = tmp_path / "artifacts" / "shard-0.parquet"
    mine = paths.temp_for(target)
    assert mine.parent == target.parent and mine.name.startswith(".shard-0.parquet.")
    other = subprocess.run([sys.executable, "-c", "import sys; from cinf_core import paths; "
                            "print(paths.temp_for(sys.argv[1]))", str(target)],
                           capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert Path(other).parent == target.parent and Path(other) != mine

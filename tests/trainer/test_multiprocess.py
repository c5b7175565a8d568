"""Data parallel on this CPU-only machine: two real ranks (torchrun + gloo) against one process on the same rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "scripts" / "mig_gains_worker.py"


def run_worker(out_dir: Path, processes: int) -> list[dict]:
    out_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER), str(out_dir)]
    else:
        # --multi_gpu without a GPU runs torchrun with gloo; `--cpu --num_processes 2` would silently run one process
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   "29517", str(WORKER), str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow
def test_two_ranks_give_the_same_gains_as_one_process(tmp_path):
    (single,) = run_worker(tmp_path / "one", 1)
    rank0, rank1 = run_worker(tmp_path / "two", 2)

    assert (rank0["rank"], rank0["world"], rank1["rank"], rank1["world"]) == (0, 2, 1, 2), "two real ranks ran"
    assert single["world"] == 1 and len(single["gains"]) == 12
    for rank in (rank0, rank1):
        assert rank["gains"] == pytest.approx(single["gains"], abs=1e-5)
        # the middle group is split across the ranks, yet its statistics are the single-process ones
        assert rank["mig_advantages"] == pytest.approx(single["mig_advantages"], abs=1e-4)
    local = rank0["local_advantages"] + rank1["local_advantages"]
    for split_row, single_row in zip(local, single["local_advantages"]):
        width = min(len(split_row), len(single_row))
        assert split_row[:width] == pytest.approx(single_row[:width], abs=1e-4)

    # ZeRO-3 safety: both ranks ran the same number of scoring forwards though their rows differ
    assert rank0["scoring_forwards"] == rank1["scoring_forwards"] > 0
    assert rank0["global_step"] == rank1["global_step"] == 2
    assert rank0["gain_sum_logged"] == pytest.approx(rank1["gain_sum_logged"]), "ranks log the same MIG metrics"

"""Data parallel and FSDP on this CPU-only machine: two real ranks (torchrun + gloo) against one process on the same
rows."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"
WORKER = SCRIPTS / "mig_gains_worker.py"
FSDP_WORKER = SCRIPTS / "mig_fsdp_worker.py"


def run_worker(out_dir: Path, processes: int, worker: Path = WORKER, *args: str, port: int = 29517) -> list[dict]:
    out_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if processes == 1:
        command = [sys.executable, str(worker), str(out_dir), *args]
    else:
        # --multi_gpu without a GPU runs torchrun with gloo; `--cpu --num_processes 2` would silently run one process
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), str(worker), str(out_dir), *args]
    # a rank that waits for a collective the other never issues hangs: the timeout turns that into a failure
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
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


def _steps(loglik: list[list]) -> list[list[float]]:
    """l_0..l_K of each row, without the padding (None) after a row's last step."""
    return [[value for value in row if value is not None] for row in loglik]


def _fsdp_worker():
    spec = importlib.util.spec_from_file_location("mig_fsdp_worker", FSDP_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fsdp_ranks_with_uneven_scoring_run_the_same_forwards_and_give_the_single_process_gains(tmp_path):
    """
    FSDP2 (accelerate's preparation; see the worker for why its FSDP selection is forced on CPU): the ranks hold
    completions with different step counts, so one prefix per forward means different numbers of scoring forwards.
    Every forward all-gathers the sharded parameters: the ranks must agree on one count before the first forward
    and pad with dummy forwards, or training hangs or aborts with a collective mismatch.
    """
    ranks = run_worker(tmp_path / "two", 2, FSDP_WORKER, "fsdp", port=29518)
    single = _fsdp_worker().run(str(tmp_path / "one"), fsdp=False)  # the reference: one process, unsharded

    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)], "two real ranks ran"
    assert all(r["distributed_type"] == "DistributedType.FSDP" and r["global_step"] == 2 for r in ranks)
    assert single["world"] == 1 and len(single["calls"]) == 2
    for call in range(2):
        rank0, rank1 = (r["calls"][call] for r in ranks)
        for record in (rank0, rank1):
            # the policy is really sharded: an FSDP2 module whose decoder layers keep only their shard between forwards
            assert record["fsdp2"] and record["layer_weight"] == "DTensor"
        # the ranks' rows need different numbers of forwards, yet both ran the larger count
        assert rank0["needed"] != rank1["needed"]
        assert rank0["forwards"] == rank1["forwards"] == max(rank0["needed"], rank1["needed"])

    # before the first update: each rank's l_k and the gathered gains are those of one process scoring every row
    rank0, rank1 = (r["calls"][0] for r in ranks)
    expected = _steps(single["calls"][0]["loglik"])
    assert _steps(rank0["loglik"] + rank1["loglik"]) == [pytest.approx(row, abs=1e-4) for row in expected]
    for record in (rank0, rank1):
        assert record["gains"] == [pytest.approx(row, abs=1e-5) for row in single["calls"][0]["gains"]]
    # the block method's split attention is routed through the sharded model's config, and gives the same l_k
    assert rank0["block_forwards"] == rank1["block_forwards"]
    for record, rows in ((rank0, expected[:4]), (rank1, expected[4:])):
        assert record["block_split"]
        assert record["block_loglik"] == [pytest.approx(row, abs=1e-4) for row in rows]
    # FSDP1 (torch's wrapper, which forwards `config` to the wrapped model): block with split attention, and prefix
    for rank, rows in zip(ranks, (expected[:4], expected[4:])):
        fsdp1 = rank["fsdp1"]
        assert fsdp1["wrapper"] == "FullyShardedDataParallel" and fsdp1["block"]["split"]
        for method in ("block", "prefix"):
            assert fsdp1[method]["loglik"] == [pytest.approx(row, abs=1e-4) for row in rows]
    prefix0, prefix1 = (rank["fsdp1"]["prefix"] for rank in ranks)
    assert prefix0["needed"] != prefix1["needed"]
    assert prefix0["forwards"] == prefix1["forwards"] == max(prefix0["needed"], prefix1["needed"])


FSDP_ROUTES_WORKER = SCRIPTS / "mig_fsdp_routes_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("route, port", [("fused", 29519), ("cache", 29520)])
def test_fsdp_ranks_run_the_same_forwards_on_the_fused_and_cache_routes(tmp_path, route, port):
    """
    FSDP2 on 2 CPU ranks (see mig_fsdp_worker.py), MIG's cheap scoring routes: `fused` (the block pass replaces TRL's
    old-log-prob forward and gives both) and `cache` (the sharded policy generates; only the answer copies run against
    its key/value cache, in forwards grouped by copy tokens, whose number depends on each rank's completions). Every
    forward all-gathers the sharded parameters: the ranks agree on one count before the first and run it, and l_k
    (and the fused old log-probs) are those of one unsharded process scoring every row.
    """
    spec = importlib.util.spec_from_file_location("mig_fsdp_routes_worker", FSDP_ROUTES_WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ranks = run_worker(tmp_path / "two", 2, FSDP_ROUTES_WORKER, "fsdp", route, port=port)
    single = module.run(str(tmp_path / "one"), fsdp=False, route=route)

    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)], "two real ranks ran"
    steps = 4 if route == "fused" else 2  # fused: two generations, each trained on twice (num_iterations 2)
    assert all(r["distributed_type"] == "DistributedType.FSDP" and r["global_step"] == steps for r in ranks)
    assert len(single["calls"]) == 2 and single["calls"][0]["routes"] == [route]
    for call in range(2):
        rank0, rank1 = (r["calls"][call] for r in ranks)
        for record in (rank0, rank1):
            assert record["fsdp2"] and record["routes"] == [route], "the route ran on the sharded policy"
            assert len(record["asked"]) == 1, "one agreement, before the first forward"
        # whatever each rank's rows need, both ran the largest count asked
        assert rank0["forwards"] == rank1["forwards"] == max(rank0["asked"] + rank1["asked"])
    if route == "cache":  # the ranks' completions differ in steps and duplicates: unequal forward needs, made equal
        for call in range(2):
            assert ranks[0]["calls"][call]["asked"] != ranks[1]["calls"][call]["asked"]

    # before the first update: l_k (and old log-probs) of each rank's rows are those of one process scoring every row
    rank0, rank1 = (r["calls"][0] for r in ranks)
    expected = _steps(single["calls"][0]["loglik"])
    assert _steps(rank0["loglik"] + rank1["loglik"]) == [pytest.approx(row, abs=1e-4) for row in expected]
    if route == "fused":
        old = rank0["old_logp_sums"] + rank1["old_logp_sums"]
        assert old == pytest.approx(single["calls"][0]["old_logp_sums"], abs=1e-3)
    else:
        assert rank0["old_logp_sums"] is None, "no TRL forward to fold into: the cache route ran instead"

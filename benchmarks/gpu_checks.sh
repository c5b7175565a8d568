#!/usr/bin/env bash
# Issue 23's GPU checks as one prepared call of a lent GPU machine (the `device` tool), or a smoke test on the CPU:
#   1. bench_step.py --preset all: the four presets' time and memory ratios (JSON lines), with a torch profiler table
#      of one GRPO and one MIG cycle per preset;
#   2. a pair of 20-step runs, GRPO and MIG, same seed, at the GPU studies' shapes (recipes/demo/mig_char.yaml with
#      gpu_long.yaml's overrides: 64 problems x 8 completions per update, scoring micro-batch 64): run times from each
#      run's accuracy.json.
# Everything it writes goes to $OUT (the device tool's folder that comes back), else outputs/gpu_checks.
#
# Wheels: the GPU image has torch, transformers, accelerate and peft but not trl, datasets or math-verify. Download
# them here once (they are ignored by git), then carry `.whl`:
#   bash benchmarks/gpu_checks.sh --download-wheels
# and on the device machine (run's command, carry [".whl"]):
#   bash benchmarks/gpu_checks.sh
# `--quick` runs tiny sizes (bench_step.py --quick, 2-step runs on the CPU demo's warm start): a smoke test that every
# stage runs, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 latex2sympy2_extended==1.11.0
        antlr4-python3-runtime==4.13.2)

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$wheel"
    done
    ls -la .whl
    exit 0
fi
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

OUT="${OUT:-outputs/gpu_checks}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
    python3 -c "import torch, transformers, trl, peft, accelerate; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__,
'accelerate', accelerate.__version__)"
    git log -1 --format='library commit %h %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"

# 1. the four presets; --threads 0: torch's own thread count (the host side of a GPU run)
if (( QUICK )); then bench=(--quick); else bench=(--repeats 3); fi
python3 benchmarks/bench_step.py --preset all --threads 0 "${bench[@]}" --profile "$OUT/profile.txt" 2>&1 \
    | tee "$OUT/bench_step.log"
grep '^{' "$OUT/bench_step.log" > "$OUT/bench_step.jsonl"
cat "$OUT"/profile_*.txt > "$OUT/profiles.txt" && rm "$OUT"/profile_*.txt   # one file back instead of four

# 2. the 20-step pair, GRPO then MIG, seed 0, one process each (the warm start is built by the first)
if (( QUICK )); then
    pair=(--config recipes/demo/mig.yaml --max_steps 2 --per_device_train_batch_size 16 --accuracy_eval_steps 0
          --accuracy_eval_max_samples 8)
else
    pair=(--config recipes/demo/mig_char.yaml --use_cpu false --max_steps 20 --per_device_train_batch_size 512
          --mig_scoring_batch_size 64 --temperature 0.7 --logging_steps 5 --accuracy_eval_steps 0
          --accuracy_eval_batch_size 200 --accuracy_eval_max_samples 200)
fi
for algorithm in grpo mig; do
    python3 -m trl_mig train "${pair[@]}" --algorithm "$algorithm" --seed 0 \
        --output_dir "outputs/gpu_checks_pair/$algorithm" 2>&1 | tail -n 5
done
python3 - "$OUT/run_pair.json" <<'EOF'
import json, sys
runs = {a: json.load(open(f"outputs/gpu_checks_pair/{a}/accuracy.json")) for a in ("grpo", "mig")}
seconds = {a: r["timings"]["train_seconds"] for a, r in runs.items()}
summary = {"train_seconds": seconds, "time_ratio": round(seconds["mig"] / seconds["grpo"], 3),
           "steps": {a: r["global_steps"] for a, r in runs.items()},
           "accuracy_after": {a: r["accuracy"]["after"] for a, r in runs.items()}}
json.dump(summary, open(sys.argv[1], "w"), indent=1)
print(json.dumps(summary))
EOF
ls -la "$OUT"

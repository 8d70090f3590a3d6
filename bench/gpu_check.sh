#!/usr/bin/env bash
# GPU checks that CPU machines cannot run: short trainings through the CLI with fp32, bf16,
# fp16 (grad scaler + skipped-steps counter), FSDP2 (1 process) and DeepSpeed ZeRO-2
# (1 process). Prints PASS/FAIL and samples/s for each; exits 1 if any failed.
# Budget: under 8 minutes on one H100 (each run has a 120 s timeout).
#
#   bash bench/gpu_check.sh            # from the repository root
#   PYTHON=/path/to/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$OUT"
CFG=configs/spiral_mlp.py
# A model big enough to keep the GPU busy, small enough to finish in seconds.
COMMON=(model.hidden=1024 model.depth=4 train_dataloader.dataset.size=65536
        train_dataloader.batch_size=512 val_dataloader.dataset.size=4096 train_cfg.max_epochs=2
        train_cfg.val_interval=2 default_hooks.logger.interval=16 default_hooks.checkpoint.interval=2
        param_scheduler=None)
# GPU_CHECK_EXTRA="k=v ..." adds overrides (e.g. a tiny model to dry-run this script on a CPU).
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA:-}"
COMMON+=("${EXTRA[@]}")
RESULTS=()
FAILED=0

# check NAME EXPECT_SCALER: read the run's scalars; pass if losses are finite and went down, a
# checkpoint was written, and the skipped-steps counter exists exactly when a scaler should.
check() {
    "$PY" - "$OUT/$1" "$2" "$3" <<'PYEOF'
import json, math, sys
from pathlib import Path
work, expect_scaler, wall = Path(sys.argv[1]), sys.argv[2] == '1', float(sys.argv[3])
runs = [p for p in work.iterdir() if (p / 'scalars.jsonl').is_file()]
assert runs, 'no scalars.jsonl written'
rec = [json.loads(l) for l in (runs[0] / 'scalars.jsonl').read_text().splitlines()]
train = [r for r in rec if 'loss' in r]
assert train and all(math.isfinite(r['loss']) for r in train), 'non-finite or no loss'
assert train[-1]['loss'] < train[0]['loss'], f"loss did not go down: {train[0]['loss']} -> {train[-1]['loss']}"
assert (work / 'checkpoints' / 'latest').is_file(), 'no checkpoint'
has = any('skipped_steps' in r for r in train)
assert has == expect_scaler, f'skipped_steps logged: {has}, expected {expect_scaler}'
sps = [r['samples_per_s'] for r in train if 'samples_per_s' in r]
rate = sum(sps) / len(sps) if sps else 65536 * 2 / wall
skipped = train[-1].get('skipped_steps')
print(f'{rate:10.0f} samples/s  loss {train[0]["loss"]:.3f}->{train[-1]["loss"]:.3f}'
      + (f'  skipped_steps={skipped}' if skipped is not None else ''))
PYEOF
}

run() {  # run NAME EXPECT_SCALER LAUNCH... -- OPTIONS...
    local name=$1 scaler=$2; shift 2
    local launch=() opts=()
    while [ "$1" != -- ]; do launch+=("$1"); shift; done; shift
    opts=("$@")
    local start=$SECONDS
    if timeout 120 "${launch[@]}" -m scale_runner train "$CFG" --work-dir "$OUT/$name" \
            --cfg-options "${COMMON[@]}" experiment_name="$name" "${opts[@]}" \
            >"$OUT/$name.out" 2>&1; then
        local wall=$((SECONDS - start))
        if line=$(check "$name" "$scaler" "$wall" 2>&1); then
            RESULTS+=("PASS  $(printf '%-10s' "$name") ${wall}s  $line")
            return
        fi
        RESULTS+=("FAIL  $(printf '%-10s' "$name") check: $(echo "$line" | tail -n 1)")
    else
        RESULTS+=("FAIL  $(printf '%-10s' "$name") exit $? after $((SECONDS - start))s: $(grep -v '^\s*$' "$OUT/$name.out" | tail -n 1)")
    fi
    FAILED=1
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'accelerate', accelerate.__version__)"
ACC=("$PY" -m accelerate.commands.launch --num_machines 1 --dynamo_backend no)

run fp32 0 "$PY" -- accelerator.mixed_precision=no
run bf16 0 "$PY" -- accelerator.mixed_precision=bf16
run fp16 1 "$PY" -- accelerator.mixed_precision=fp16
run fsdp 0 "${ACC[@]}" --config_file launch/fsdp.yaml --num_processes 1 --main_process_port 29511 -- \
    optim_wrapper.clip_grad.max_norm=1.0
if "$PY" -c "import deepspeed" 2>/dev/null; then
    run zero2 0 "${ACC[@]}" --config_file launch/deepspeed_zero2.yaml --num_processes 1 \
        --main_process_port 29512 --
else
    RESULTS+=("FAIL  zero2      deepspeed is not installed: pip install deepspeed")
    FAILED=1
fi

echo
echo "== scale_runner GPU check (logs in $OUT) =="
printf '%s\n' "${RESULTS[@]}"
exit $FAILED

#!/usr/bin/env bash
# GPU checks that CPU machines cannot run: short trainings through the CLI with fp32, bf16,
# fp16 (grad scaler + skipped-steps counter), FSDP2 (1 process) and DeepSpeed ZeRO-2
# (1 process), and exact resume (bit-identical weights) for fp32 and FSDP2; then the LM
# benchmark bench/gpu_lm.py (a 124M GPT in bf16: hand-written Accelerate loop vs scale_runner,
# eager, torch.compile'd and FSDP2; tokens/s, MFU, peak memory, PASS when scale_runner reaches
# >= 0.98x the loop's tokens/s at <= 1.02x its memory). Prints one summary table; exits 1 if
# any failed. The trainings take under 5 minutes on one H100 (120 s timeout each), the
# benchmark about 5 more (GPU_LM_TIMEOUT, 900 s).
#
#   bash bench/gpu_check.sh            # from the repository root
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   GPU_CHECK_ONLY="fsdp fsdp-resume zero2" bash bench/gpu_check.sh   # some checks only
#   GPU_CHECK_ONLY=gpu_lm GPU_LM_ARGS="--reps 2 --batch 16" bash bench/gpu_check.sh
#   GPU_CHECK_ONLY=gpu_lm GPU_LM_ARGS="--device cpu --tiny --variants loop,runner" bash bench/gpu_check.sh
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
has = any('scaler_skips' in r for r in train)
assert has == expect_scaler, f'scaler_skips logged: {has}, expected {expect_scaler}'
sps = [r['samples_per_s'] for r in train if 'samples_per_s' in r]
rate = sum(sps) / len(sps) if sps else 65536 * 2 / wall
skipped = train[-1].get('scaler_skips')
print(f'{rate:10.0f} samples/s  loss {train[0]["loss"]:.3f}->{train[-1]["loss"]:.3f}'
      + (f'  scaler_skips={skipped}' if skipped is not None else ''))
PYEOF
}

wanted() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

train() {  # train NAME LAUNCH... -- OPTIONS...: one CLI training run, output in $OUT/NAME.out
    local name=$1; shift
    local launch=()
    while [ "$1" != -- ]; do launch+=("$1"); shift; done; shift
    timeout 120 "${launch[@]}" -m scale_runner train "$CFG" --work-dir "$OUT/$name" \
        --cfg-options "${COMMON[@]}" experiment_name="$name" "$@" >>"$OUT/$name.out" 2>&1
}

fail() {  # fail NAME WHY
    RESULTS+=("FAIL  $(printf '%-12s' "$1") $2")
    FAILED=1
}

run() {  # run NAME EXPECT_SCALER LAUNCH... -- OPTIONS...
    local name=$1 scaler=$2; shift 2
    wanted "$name" || return 0
    local start=$SECONDS rc=0 line
    train "$name" "$@" || rc=$?
    local wall=$((SECONDS - start))
    if [ $rc -ne 0 ]; then
        fail "$name" "exit $rc after ${wall}s: $(grep -v '^\s*$' "$OUT/$name.out" | tail -n 1)"
    elif line=$(check "$name" "$scaler" "$wall" 2>&1); then
        RESULTS+=("PASS  $(printf '%-12s' "$name") ${wall}s  $line")
    else
        fail "$name" "check: $(echo "$line" | tail -n 1)"
    fi
}

# resume NAME BASE LAUNCH... -- OPTIONS...: one epoch, then --resume to the second; the weights
# must equal run BASE's (same options, two epochs straight) bit for bit.
resume() {
    local name=$1 base=$2; shift 2
    wanted "$name" || return 0
    local start=$SECONDS line
    if ! train "$name" "$@" train_cfg.max_epochs=1 default_hooks.checkpoint.interval=1; then
        fail "$name" "first half: $(tail -n 1 "$OUT/$name.out")"; return
    fi
    local launch=()
    while [ "$1" != -- ]; do launch+=("$1"); shift; done; shift
    if ! timeout 120 "${launch[@]}" -m scale_runner train "$CFG" --work-dir "$OUT/$name" --resume \
            --cfg-options "${COMMON[@]}" experiment_name="$name" "$@" >>"$OUT/$name.out" 2>&1; then
        fail "$name" "resumed half: $(tail -n 1 "$OUT/$name.out")"; return
    fi
    if line=$("$PY" - "$OUT" "$base" "$name" <<'PYEOF' 2>&1
import sys
from pathlib import Path
from safetensors.torch import load_file
def final(name):
    root = Path(sys.argv[1]) / name / 'checkpoints'
    return load_file(root / (root / 'latest').read_text().strip() / 'model.safetensors')
a, b = final(sys.argv[2]), final(sys.argv[3])
assert a.keys() == b.keys(), 'different tensors'
diff = [k for k in a if not a[k].equal(b[k])]
assert not diff, f'{len(diff)} of {len(a)} tensors differ, e.g. {diff[0]}'
print(f'{len(a)} tensors bit-identical to the uninterrupted {sys.argv[2]} run')
PYEOF
    ); then
        RESULTS+=("PASS  $(printf '%-12s' "$name") $((SECONDS - start))s  $line")
    else
        fail "$name" "$(echo "$line" | tail -n 1)"
    fi
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'accelerate', accelerate.__version__)"
ACC=("$PY" -m accelerate.commands.launch --num_machines 1 --dynamo_backend no)
FSDP=("${ACC[@]}" --config_file launch/fsdp.yaml --num_processes 1 --main_process_port 29511)

run fp32 0 "$PY" -- accelerator.mixed_precision=no
run bf16 0 "$PY" -- accelerator.mixed_precision=bf16
run fp16 1 "$PY" -- accelerator.mixed_precision=fp16
resume resume fp32 "$PY" -- accelerator.mixed_precision=no
run fsdp 0 "${FSDP[@]}" -- optim_wrapper.clip_grad.max_norm=1.0
resume fsdp-resume fsdp "${FSDP[@]}" -- optim_wrapper.clip_grad.max_norm=1.0
if ! wanted zero2; then
    :
elif "$PY" -c "import deepspeed" 2>/dev/null; then
    run zero2 0 "${ACC[@]}" --config_file launch/deepspeed_zero2.yaml --num_processes 1 \
        --main_process_port 29512 --
else
    fail zero2 "deepspeed is not installed: pip install deepspeed"
fi

# gpu_lm: one summary row per variant (the runner rows PASS or FAIL against the goal)
if wanted gpu_lm; then
    start=$SECONDS
    read -r -a LM_ARGS <<< "${GPU_LM_ARGS:-}"
    if timeout "${GPU_LM_TIMEOUT:-900}" "$PY" bench/gpu_lm.py --reps 1 --json "$OUT/gpu_lm.json" \
            "${LM_ARGS[@]}" >"$OUT/gpu_lm.out" 2>&1; then
        rows=$("$PY" - "$OUT/gpu_lm.json" "$((SECONDS - start))" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    name = f"gpu_lm:{r['variant']}"
    if r.get('failed'):
        print(f'FAIL  {name:<21} the run failed (see gpu_lm.out)')
        continue
    mfu = f"MFU {r['mfu']:.3f}" if r['mfu'] is not None else 'MFU -'
    mem = f"{r['peak_mib']:.0f} MiB" if r['peak_mib'] is not None else '- MiB'
    head = 'PASS' if r.get('meets_goal', True) else 'FAIL'
    mem_x = f"{r['memory_ratio']:.3f}x" if r.get('memory_ratio') else '-'
    vs = f"  {r['tokens_ratio']:.3f}x tokens/s, {mem_x} memory of {r['vs']}" if 'vs' in r else ''
    print(f"{head}  {name:<21} {sys.argv[2]}s  {r['tokens_per_s']:10.0f} tokens/s  {mfu}  {mem}{vs}")
PYEOF
        )
        while IFS= read -r line; do
            RESULTS+=("$line")
            [[ "$line" == FAIL* ]] && FAILED=1
        done <<< "$rows"
    else
        fail gpu_lm "exit after $((SECONDS - start))s: $(grep -v '^\s*$' "$OUT/gpu_lm.out" | tail -n 1)"
    fi
fi

echo
echo "== scale_runner GPU check (logs in $OUT) =="
printf '%s\n' "${RESULTS[@]}"
exit $FAILED

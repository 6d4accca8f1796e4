#!/usr/bin/env bash
# The GPU proof in one command: every GPU path of the project run and measured at once, in at most ~9 minutes on one
# H100/H200, with a short table printed last.
#
#   bash bench/gpu_check.sh [OUT] [--cpu] [--only STEPS] [--skip STEPS]
#
# OUT (default $OUT, else runs/gpu_check) receives gpu_check.json (every figure, rewritten after each step),
# gpu_check.log (all output) and summary.txt (the table). --cpu runs the same steps on the CPU with tiny sizes (the
# test suite does, so the script cannot rot between GPU runs; nothing it prints is a GPU figure). --only/--skip take
# step names or the groups "nodali" and "dali", comma-separated: e.g. `--only dali` once the DALI wheels are in
# (env and data always run, as the other steps need them).
#
# Steps, most important first; those needing DALI come last so that they can run later, after the wheels:
#   env         versions, GPU, missing packages (installed first from wheels brought along, see below)
#   data        a fake CelebA (fake_celeba.py) and its shards at 64 px (32 with --cpu) (prepare_shards.py)
#   train_grid  bench/train_step.py --parts grid: every preset x precision x layout x eager/compile, budgeted
#   sampling    bench/sampling.py: DDIM-50 and DDPM-1000 for 64 faces, CUDA graphs, the largest batch
#   ema         bench/train_step.py --parts ema,draws: torch-ema's update against one foreach call; what drawing the
#               global batch's random inputs (t, noise) for W = 1, 2, 4, 8 ranks costs against a celeba64 step
#   decode      (DALI) bench/decode_check.py: mixed (GPU) decode against the CPU decode, within 2/255
#   resume      (DALI) bench/resume_check.py: small64 fp16 on the GPU, SIGTERM half-way, resumed, curve continues
#   pytest_cuda (DALI) pytest -m cuda
#   data_e2e    (DALI) bench/train_step.py --parts data,e2e: data-wait shares (data.make_loader: the global order's
#               fn.external_source pipeline), the seed-style loop against ours
# Each step runs under `timeout`, within what is left of GPU_CHECK_BUDGET_S (default 530 s), and one failing does
# not stop the others.
#
# Packages: where nvidia-dali, webdataset or torch-ema are missing, it adds /tmp/site to PYTHONPATH when that exists
# (where ../shared/device/dali-wheels.sh's .dw/install.sh installs them), else runs .dw/install.sh when its parts are
# in /tmp/dw, else pip-installs any wheels in .whl/ into /tmp/site. README.md's "GPU check" says how to bring them.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu only="" skip="" out="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --only) only="$2"; shift ;;
    --skip) skip="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
out="${out:-runs/gpu_check}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$work/json"
rm -f "$out/gpu_check.json" "$out/summary.txt"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
budget="${GPU_CHECK_BUDGET_S:-530}"
start=$SECONDS
echo "gpu_check.sh: mode $mode, out $out, scratch $work, python $py, budget ${budget}s, $(date -u +%FT%TZ)"

# ------------------------------------------------------------------------------------------------- packages
# missing: the packages the python cannot import (one interpreter start: importing DALI takes seconds).
missing() {
  "$py" -c 'import importlib.util as u; print(" ".join(n for m, n in (("nvidia.dali", "nvidia-dali"),
    ("webdataset", "webdataset"), ("torch_ema", "torch-ema")) if not u.find_spec(m.split(".")[0]) or
    not u.find_spec(m)))' 2>/dev/null || echo "nvidia-dali webdataset torch-ema"
}
use_site() {
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
}
lacking="$(missing)"
if [ -n "$lacking" ] && [ -d /tmp/site ]; then use_site; lacking="$(missing)"; fi
if [ -n "$lacking" ] && [ -f .dw/install.sh ] && compgen -G "/tmp/dw/part-*" >/dev/null; then
  echo "installing the wheels of .dw/install.sh (missing: $lacking)"
  bash .dw/install.sh && use_site
  lacking="$(missing)"
fi
if [ -n "$lacking" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing .whl/*.whl into /tmp/site (missing: $lacking)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && use_site
  lacking="$(missing)"
fi
[ -n "$lacking" ] && echo "still missing: $lacking (the steps that need them fail, or are skipped without DALI)"
case " $lacking " in *" nvidia-dali "*) dali=no ;; *) dali=yes ;; esac

# ---------------------------------------------------------------------------------------------------- steps
in_list() { case ",$2," in *",$1,"*) return 0 ;; esac; return 1; }
# record NAME STATUS RC SECONDS REASON: one line of $work/steps.jsonl, then the merged JSON is rewritten.
record() {
  "$py" - "$work/steps.jsonl" "$@" <<'PY'
import json, sys
path, name, status, rc, seconds, reason = sys.argv[1:7]
with open(path, "a") as f:
    f.write(json.dumps({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                        "reason": reason}) + "\n")
PY
  "$py" bench/gpu_report.py collect "$work" "$out" || echo "gpu_check.sh: could not write $out/gpu_check.json"
}
# step NAME GROUP LIMIT_S COMMAND...: run COMMAND under timeout unless deselected, DALI-less, or out of time.
step() {
  local name=$1 group=$2 limit=$3; shift 3
  # env and data are what every other step stands on: --only keeps them (--skip can still drop them).
  if [ -n "$only" ] && ! in_list "$name" "$only,env,data" && ! in_list "$group" "$only"; then return 0; fi
  if in_list "$name" "$skip" || in_list "$group" "$skip"; then return 0; fi
  if [ "$group" = dali ] && [ "$dali" = no ]; then
    echo "=== $name: skipped (no NVIDIA DALI)"
    record "$name" skipped 0 0 "no NVIDIA DALI: bring its wheels, then --only dali"
    return 0
  fi
  local left=$((budget - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped (the ${budget}s budget is spent)"; record "$name" skipped 0 0 "GPU_CHECK_BUDGET_S spent"
    return 0
  fi
  echo "=== $name (at most ${limit}s): $*"
  local t0=$SECONDS rc status reason=""
  timeout --kill-after=20 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; reason="stopped after ${limit}s" ;;
    *) status=failed; reason="exit $rc (see gpu_check.log)" ;;
  esac
  echo "=== $name: $status in $((SECONDS - t0))s"
  record "$name" "$status" "$rc" $((SECONDS - t0)) "$reason"
}

if [ "$mode" = gpu ] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check.sh: $py sees no CUDA GPU; nothing to check here (--cpu runs the same steps on the CPU)"
  rm -rf "$work"
  exit 2
fi

data="$work/data"
if [ "$mode" = cpu ]; then
  size=32 count=160 dev=cpu cpu=--cpu
  grid=(--cpu)
  samp=(--cpu)
  resume=(--preset tiny --precision fp32 --device cpu --steps 24 --batch-size 8 --log-every 2 --lr 1e-3
          --extra "--threads 1")
  e2e=(--cpu --data-steps 3)
  caps=(60 120 120 60 60 60 120 240 120)
else
  size=64 count=4096 dev=cuda cpu=""
  # Eager rows first, the likely fastest settings first, so that the budget cuts compile rows of fp32 and nchw.
  grid=(--presets celeba64,small64,celeba128 --precisions bf16,fp16,fp32 --layouts channels_last,nchw
        --modes eager,compile --warmup 3 --steps 10 --budget-s 130 --compile-estimate-s 50)
  samp=(--budget-s 75 --max-batch 1024 --throughput-steps 5 --long-fastest-only)
  resume=(--preset small64 --precision fp16 --device cuda --steps 300 --batch-size 128 --log-every 10)
  e2e=(--data-steps 40 --best-from "$work/json/train_grid.json")
  caps=(30 90 160 100 60 60 120 150 120)
fi

step env         nodali "${caps[0]}" "$py" bench/gpu_report.py env "$work" --mode "$mode"
step data        nodali "${caps[1]}" bash -c "set -e; '$py' fake_celeba.py --out '$data/celeba' --count $count; \
  '$py' prepare_shards.py --src '$data/celeba' --out '$data/shards' --size $size --samples-per-shard 512 --split all"
step train_grid  nodali "${caps[2]}" "$py" bench/train_step.py --parts grid "${grid[@]}" \
  --json "$work/json/train_grid.json"
step sampling    nodali "${caps[3]}" "$py" bench/sampling.py "${samp[@]}" --json "$work/json/sampling.json"
step ema         nodali "${caps[4]}" "$py" bench/train_step.py --parts ema,draws $cpu --json "$work/json/ema.json"
step decode      dali   "${caps[5]}" "$py" bench/decode_check.py --shards "$data/shards" $cpu \
  --json "$work/json/decode.json"
step resume      dali   "${caps[6]}" "$py" bench/resume_check.py --data "$data/shards" --out "$work/run" \
  "${resume[@]}" --json "$work/json/resume.json"
# --continue-on-collection-errors: a test module whose imports the GPU image lacks (the notebook test needs Jupyter)
# must not stop the CUDA tests of the others; its collection error is listed in the summary.
step pytest_cuda dali   "${caps[7]}" "$py" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$work/pytest_cuda.xml"
step data_e2e    dali   "${caps[8]}" "$py" bench/train_step.py --parts data,e2e "${e2e[@]}" \
  --src "$data/celeba" --shards "$data/shards" --json "$work/json/data_e2e.json"

echo "=== summary (device $dev, $((SECONDS - start))s)"
"$py" bench/gpu_report.py table "$work" "$out"
rc=$?
[ -z "${GPU_CHECK_KEEP:-}" ] && rm -rf "$work"
exit $rc

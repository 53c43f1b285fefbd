#!/usr/bin/env bash
# The GPU check in one call: everything this project can only show on a GPU, measured on a fresh GPU
# machine (one H100/H200, a bare image with torch, timm, lightning and torchmetrics but neither wandb nor
# jsonargparse, no network), within one command of at most 9 minutes.
#
#   tools/gpu_check.sh --prepare     here, on a machine with a package registry: fills the git-ignored
#                                    .gpu-carry/ (wheels for Python 3.12 / manylinux x86-64 of what the GPU
#                                    image lacks, setuptools to build the project, the CIFAR-10 JPEG
#                                    archives), prints its size and the `run` call to make
#   tools/gpu_check.sh               on the GPU machine (the `run` call): installs, unpacks, then runs each
#                                    step under its own time cap and writes results/gpu/
#   tools/gpu_check.sh --dry-run     the same steps on the CPU with tiny sizes, into results/gpu-dry-run/
#
# Options: --steps a,b (only these of pytest, bench_step, bench_step_compiled, bench_epoch, pipeline; the
# set-up always runs), --out DIR (instead of results/gpu or results/gpu-dry-run).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for the whole call: 540 on the GPU),
# GPU_CHECK_CAP_<STEP> (a step's cap), GPU_CHECK_CARRY (default .gpu-carry), GPU_CHECK_WORK (scratch folder).
# Each step's figures are written the moment it ends (results/.../<step>.json and README.md, mirrored into
# $OUT/gpu when the GPU tool sets OUT), so a call cut off at any point still brings back what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
STEPS=all
OUTDIR=
while [ $# -gt 0 ]; do
  case $1 in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    --steps) STEPS=$2; shift ;;
    --steps=*) STEPS=${1#*=} ;;
    --out) OUTDIR=$2; shift ;;
    --out=*) OUTDIR=${1#*=} ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu-carry}
LIMIT_BYTES=$((64 * 1024 * 1024))   # what the GPU tool carries: working tree + carried folders
ARCHIVES_SHARED=${DISTILL_CIFAR10_JPEG:-$REPO/../shared/data/cifar10-jpeg}
RUN_CALL="run(command=\"bash tools/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=600)"

# bytes of what travels: tracked and untracked-not-ignored files, plus the carried folder
tree_bytes() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
  else
    echo 0
  fi
}
carry_bytes() { if [ -d "$CARRY" ]; then du -sb "$CARRY" | cut -f1; else echo 0; fi; }
print_size() {
  local c t
  c=$(carry_bytes); t=$(tree_bytes)
  if [ "$c" = 0 ]; then
    echo "carried folder $CARRY: absent (tools/gpu_check.sh --prepare fills it); working tree $((t / 1024)) KiB"
  else
    echo "carried folder $CARRY: $((c / 1024 / 1024)) MiB ($c bytes); with the working tree $(((c + t) / 1024 / 1024)) MiB" \
         "of the 64 MiB the GPU tool carries: $([ $((c + t)) -lt $LIMIT_BYTES ] && echo fits || echo TOO LARGE)"
  fi
}

# ------------------------------------------------------------------------------------------ --prepare
prepare() {
  set -e
  local tmp pins name f
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  # the versions this environment runs (and the tests pass with), for the GPU machine's Python 3.12
  pins=$("$PY" - <<'EOF'
from importlib import metadata
def pin(dist, spec):
    try:
        return f"{spec}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return spec
print(pin("wandb", "wandb"), pin("jsonargparse", "jsonargparse[signatures]"))
EOF
)
  local platforms=()
  for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  rm -rf "$CARRY/wheels" "$CARRY/build" "$CARRY/data"
  mkdir -p "$CARRY/wheels" "$CARRY/build" "$CARRY/data"
  echo "pip download (Python 3.12, manylinux x86-64): $pins"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    "${platforms[@]}" -d "$tmp" $pins
  # keep only what the GPU image lacks (tools/gpu_image_packages.txt)
  for f in "$tmp"/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if ! grep -qx "$name" tools/gpu_image_packages.txt; then mv "$f" "$CARRY/wheels/"; fi
  done
  # setuptools >= 77 builds the project there (pyproject's licence field), whatever the image's is
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/build" \
    "setuptools==$("$PY" -c 'import setuptools; print(setuptools.__version__)')"
  cp "$ARCHIVES_SHARED"/cifar10-train.tar.gz "$ARCHIVES_SHARED"/cifar10-test.tar.gz "$CARRY/data/"
  "$PY" - "$CARRY" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "tools")
import prepare_cifar10 as p
carry = Path(sys.argv[1])
for name, digest in p.ARCHIVES.items():  # the archives as their README states them
    if p.sha256(carry / "data" / name) != digest:
        sys.exit(f"{carry / 'data' / name}: sha256 differs from the archive README's; the copy is damaged")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
wheels = sorted(w.name for w in (carry / "wheels").glob("*.whl"))
(carry / "PREPARED.json").write_text(json.dumps(dict(commit=commit, when=time.strftime("%Y-%m-%d %H:%M:%S"),
    wheels=wheels, build=sorted(w.name for w in (carry / "build").glob("*.whl"))), indent=1) + "\n")
print(f"{len(wheels)} wheels: {', '.join(wheels)}")
EOF
  print_size
  if [ $(($(carry_bytes) + $(tree_bytes))) -ge $LIMIT_BYTES ]; then
    echo "gpu_check.sh --prepare: $CARRY and the working tree exceed 64 MiB; the GPU tool would refuse the call" >&2
    return 1
  fi
  echo "On the GPU machine, one call of the device tool (from the checkout the session started in):"
  echo "  $RUN_CALL"
}

if [ "$MODE" = prepare ]; then
  prepare
  exit $?
fi

# ---------------------------------------------------------------------------------- GPU run, dry run
DRY=0
[ "$MODE" = dry ] && DRY=1
OUTDIR=${OUTDIR:-results/$([ $DRY = 1 ] && echo gpu-dry-run || echo gpu)}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/distill-gpu-check.XXXXXX")}
mkdir -p "$OUTDIR" "$WORK"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
if [ "$STEPS" = all ]; then rm -f "$OUTDIR"/*.json "$OUTDIR"/README.md "$LOG"; fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR=$WORK/wandb
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}   # shared by every step (warm compiles)
mkdir -p "$WANDB_DIR"
if [ $DRY = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET:-1800}; DEFAULT_CAP=600
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # dynamo and AOT autograd as on the GPU, without inductor's C++ code generation (minutes on a small CPU);
  # GPU_CHECK_DRY_INDUCTOR=1 compiles with inductor here too
  if [ "${GPU_CHECK_DRY_INDUCTOR:-0}" != 1 ]; then export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:aot_eager"; fi
else
  BUDGET=${GPU_CHECK_BUDGET:-540}; DEFAULT_CAP=
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
cap_of() {  # step, GPU default
  local var="GPU_CHECK_CAP_$(echo "$1" | tr a-z A-Z)"
  echo "${!var:-${DEFAULT_CAP:-$2}}"
}
selected() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }
PIPELINE_RESERVE=0
selected pipeline && PIPELINE_RESERVE=$(cap_of pipeline 360)
[ $DRY = 1 ] && PIPELINE_RESERVE=0
report() { "$PY" tools/gpu_check_report.py "$@"; }
mirror() {  # what the GPU tool brings back: $OUT/<folder>/<at most 8 files>
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    mkdir -p "$OUT/$(basename "$OUTDIR")" && cp -f "$OUTDIR"/* "$OUT/$(basename "$OUTDIR")/" 2>/dev/null
  fi
  return 0
}
EXTRA=()
# run_step NAME CAP CMD...: CMD under `timeout`, its output into the log, its record and the README after
run_step() {
  local name=$1 cap=$2 left rc t0 t1 secs
  shift 2
  if [ "$name" != install ] && [ "$name" != data ] && ! selected "$name"; then return 0; fi
  left=$((DEADLINE - $(date +%s)))
  [ "$name" != pipeline ] && left=$((left - PIPELINE_RESERVE))
  [ "$cap" -gt "$left" ] && cap=$left
  rm -f "$OUTDIR/$name.json"
  if [ "$cap" -lt 10 ]; then
    echo "== $name: skipped, ${cap}s left of the budget" | tee -a "$LOG"
    report record "$name" --out "$OUTDIR" --rc -1 --seconds 0 --cap "$cap" --command "$*" --reason "no time left"
  else
    echo "== $name (cap ${cap}s, $(( $(date +%s) - START ))s into the check): $*" | tee -a "$LOG"
    t0=$(date +%s.%N)
    timeout --kill-after=15 "$cap" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
    echo "== $name: exit $rc after ${secs}s" | tee -a "$LOG"
    report record "$name" --out "$OUTDIR" --rc "$rc" --seconds "$secs" --cap "$cap" --command "$*" \
      --log "$WORK/$name.log" "${EXTRA[@]}"
  fi
  EXTRA=()
  report readme --out "$OUTDIR"
  mirror
}

echo "gpu_check.sh $([ $DRY = 1 ] && echo '--dry-run ')-> $OUTDIR (scratch $WORK, budget ${BUDGET}s)" | tee -a "$LOG"
print_size | tee -a "$LOG"

# --- set-up: wheels the image lacks, the project itself (no dependencies), the data
SITE=$WORK/site BUILD=$WORK/build PROJECT=$WORK/project
PLATFORM_ARGS="--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_35_x86_64 \
--platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
--platform manylinux1_x86_64"
PIP_QUIET="-q --disable-pip-version-check --no-input"
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  if [ $DRY = 1 ]; then  # the carried wheels are Python 3.12's: check that they install there, one version each
    WHEELS_CMD="$PY -m pip install $PIP_QUIET --dry-run --no-index --no-deps --only-binary=:all: --target $SITE $PLATFORM_ARGS $CARRY/wheels/*.whl"
  else
    WHEELS_CMD="$PY -m pip install $PIP_QUIET --no-index --no-deps --no-compile --no-cache-dir --target $SITE $CARRY/wheels/*.whl"
  fi
else
  WHEELS_CMD="echo no carried wheels in $CARRY/wheels: this environment must already hold wandb and jsonargparse"
fi
# the project is built with setuptools >= 77 (pyproject's licence field): the carried one, this environment's,
# or else one pip fetches for an isolated build (a registry is then needed: a CPU machine, never the GPU)
BUILD_CMD=true
OFFLINE_BUILD="--no-index --no-build-isolation"
if compgen -G "$CARRY/build/*.whl" >/dev/null; then
  BUILD_CMD="$PY -m pip install $PIP_QUIET --no-index --no-deps --no-compile --target $BUILD $CARRY/build/*.whl"
elif ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  OFFLINE_BUILD=
fi
PROJECT_CMD="env PYTHONPATH=$BUILD:$SITE:${PYTHONPATH:-} $PY -m pip install $PIP_QUIET --no-deps $OFFLINE_BUILD --no-compile --target $PROJECT ."
run_step install "$(cap_of install 90)" bash -c "set -e; $WHEELS_CMD; $BUILD_CMD; $PROJECT_CMD"
export PYTHONPATH="$PROJECT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PROJECT/bin:$PATH"
if [ -x "$PROJECT/bin/distill" ]; then DISTILL=(distill); else DISTILL=("$PY" -m distill.cli); fi

if [ $DRY = 1 ]; then DATA=$WORK/data; LIMIT=(--max-per-class 20); else DATA=$REPO/data; LIMIT=(); fi
if compgen -G "$CARRY/data/*.tar.gz" >/dev/null; then ARCHIVES=$CARRY/data; else ARCHIVES=$ARCHIVES_SHARED; fi
export DISTILL_CIFAR10_JPEG=$(cd "$ARCHIVES" 2>/dev/null && pwd || echo "$ARCHIVES")   # the gpu tests' real images
run_step data "$(cap_of data 90)" "$PY" tools/prepare_cifar10.py --archives "$DISTILL_CIFAR10_JPEG" --out "$DATA" "${LIMIT[@]}"
timeout 120 "$PY" tools/gpu_check_report.py env --out "$OUTDIR" --carry "$CARRY" $([ $DRY = 1 ] && echo --dry-run) \
  2>&1 | tee -a "$LOG"
mirror

# --- pytest -m gpu (skipped without CUDA: the dry run shows they are collected and skipped)
PYTEST=("$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$WORK/pytest.xml" -o junit_family=xunit1)
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n 3); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout 300); fi
EXTRA=(--junit "$WORK/pytest.xml")
run_step pytest "$(cap_of pytest 75)" "${PYTEST[@]}" tests

# --- step benchmark: DeiT-S + RegNetY-16GF at 224 px, bf16, plain and with the student compiled
if [ $DRY = 1 ]; then
  STEP_ARGS=(--preset tiny --device cpu --threads 1 --warmup 1 --steps 2 --rounds 1)
  EPOCH_ARGS=(--preset tiny --device cpu --threads 1 --num-images 200 --epochs 1 --num-workers 0)
else
  STEP_ARGS=(--preset gpu --warmup 3 --steps 10 --rounds 2)
  EPOCH_ARGS=(--preset cifar-epoch --batch 500 --epochs 2)   # the budget recipe's batch: its compiled graphs
fi
run_step bench_step "$(cap_of bench_step 45)" "$PY" tools/bench.py "${STEP_ARGS[@]}" --json "$OUTDIR/bench_step.json"
# the student compiled (the MFU target); RegNetY-16GF would take minutes of the budget to compile
run_step bench_step_compiled "$(cap_of bench_step_compiled 75)" "$PY" tools/bench.py "${STEP_ARGS[@]}" --compile-student --no-cache \
  --json "$OUTDIR/bench_step_compiled.json"

# --- CIFAR-10 epochs on the real JPEG files, on-device data, compiled: student only and with the live teacher
run_step bench_epoch "$(cap_of bench_epoch 75)" "$PY" tools/bench.py --mode epoch "${EPOCH_ARGS[@]}" \
  --data-root "$DATA/cifar10-jpeg" --compile --configs student,live --json "$OUTDIR/bench_epoch.json"

# --- the budget CIFAR-10 pipeline: teacher then student, both steps within 6 GPU-minutes
PIPE_ARGS=(--data.root "$DATA/cifar10-jpeg")
if [ $DRY = 1 ]; then
  PIPE_ARGS+=(--trainer.accelerator cpu --trainer.max_epochs 1 --trainer.check_val_every_n_epoch 1
              --data.batch_size 50 --data.num_workers 0
              --teacher.model.init_args.model cifar_resnet10 --teacher.model.init_args.model_kwargs '{"base_width": 8}'
              --student.model.init_args.student.embed_dim 32 --student.model.init_args.student.depth 1
              --student.model.init_args.student.num_heads 2)
fi
EXTRA=(--summary "$WORK/runs/summary.json" --runs "$WORK/runs")
run_step pipeline "$(cap_of pipeline 360)" "${DISTILL[@]}" pipeline recipes/cifar10_budget --out "$WORK/runs" "${PIPE_ARGS[@]}"

echo "gpu_check.sh: done in $(( $(date +%s) - START ))s; figures in $OUTDIR/README.md" | tee -a "$LOG"
print_size | tee -a "$LOG"
mirror
if [ -z "${GPU_CHECK_WORK:-}" ]; then rm -rf "$WORK"; fi
# the exit status says whether every step that ran finished
"$PY" - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
records = [json.loads(p.read_text()).get("check") for p in out.glob("*.json") if p.name != "env.json"]
records += list((json.loads((out / "env.json").read_text()).get("setup") or {}).values()) if (out / "env.json").is_file() else []
bad = [r for r in records if r and r["status"] != "ok"]
sys.exit(1 if bad else 0)
EOF

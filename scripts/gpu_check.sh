#!/usr/bin/env bash
# The whole GPU verification of diffsampler in one run, on a machine with an NVIDIA GPU, torch with CUDA, nvcc
# and Triton (offline is fine): the environment record, the missing wheels installed from wheels/, the CUDA build
# (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise), pytest -m gpu, the benchmarks, and a summary table printed
# last. Each step has its own time limit and the whole run a budget (GPU_CHECK_BUDGET_S, default 540 s); a failing
# step is recorded and the run goes on; the exit status is non-zero if any step failed. It never changes the GPU's
# settings and caches nothing (compiler caches live in a temporary folder removed at the end).
#
#   bash scripts/gpu_check.sh                 # on the GPU machine; results in $OUT (default ./gpu_check_out)
#   bash scripts/gpu_check.sh --fetch-wheels  # where a package index is reachable: fill wheels/ for the offline run
#   bash scripts/gpu_check.sh --dry-run       # without a GPU: the CPU-side parts at tiny sizes, no build
#
# $OUT receives five files: env.json, pytest-gpu.xml, summary.json, summary.txt and details.tar.gz (every
# step's log and the benchmarks' JSON and plots).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
REPORT="$ROOT/scripts/gpu_check_report.py"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/wheels}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
USAGE="usage: bash scripts/gpu_check.sh [--dry-run | --fetch-wheels | --help]"

MODE=run
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; echo "$USAGE"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option '$1' (expected --dry-run, --fetch-wheels or --help)" >&2
     echo "$USAGE" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "gpu_check.sh: one option at most, got $# ($*)" >&2; echo "$USAGE" >&2; exit 2
fi

# --- --fetch-wheels: diffusers, transformers and their pure-Python requirements, for an offline python 3.12 ---
fetch_wheels() {
  local pkg version spec req wheel have=()
  mkdir -p "$WHEELS"
  for pkg in diffusers transformers; do   # transformers: diffusers' Stable Diffusion pipelines import it
    version="$("$PY" -c "import $pkg; print($pkg.__version__)" 2>/dev/null)"
    spec="$pkg${version:+==$version}"   # the version the tests pass with here, else the newest
    echo "fetching $spec and its pure-Python requirements into $WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --abi none --platform any -d "$WHEELS" "$spec" || { echo "gpu_check.sh: pip download of $spec failed" >&2; exit 1; }
    wheel="$(find "$WHEELS" -maxdepth 1 -name "$pkg-*.whl" | sort | tail -n 1)"
    while read -r req; do
      case "$req" in torch*|"") continue ;; esac   # torch is the machine's own
      if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
          --abi none --platform any -d "$WHEELS" "$req" 2>/dev/null; then
        have+=("$req")
      else
        echo "  not fetched (no pure-Python wheel; the GPU machine must have it): $req"
      fi
    done < <("$PY" "$REPORT" requires "$wheel")
  done
  echo "  fetched: ${have[*]:-nothing else}"
  ls -1 "$WHEELS"
  echo "wheel folder size: $(du -sh "$WHEELS" | cut -f1) (keep it under ~40 MB: it travels with the repository)"
}
if [ "$MODE" = fetch ]; then fetch_wheels; exit 0; fi

# --- the run --------------------------------------------------------------------------------------------------
OUT="${OUT:-gpu_check_out}"   # relative to the caller's directory
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/bench"
: > "$WORK/steps.tsv"
START=$SECONDS
FAILED=0

export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export TRITON_INTERPRET=0   # compiled Triton on the GPU (tests/conftest.py turns the interpreter on when unset)
export TRITON_CACHE_DIR="$WORK/cache/triton" TORCHINDUCTOR_CACHE_DIR="$WORK/cache/inductor" XDG_CACHE_HOME="$WORK/cache"
# the package imports from python/; diffsampler.triton_kernels is the repository's triton_kernels/ (a link, as
# an editable install maps it)
[ -e "$ROOT/python/diffsampler/triton_kernels" ] || ln -s ../../triton_kernels "$ROOT/python/diffsampler/triton_kernels"

record() {  # name status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.tsv"
  [ "$2" = fail ] && FAILED=1
  tar -czf "$OUT/details.tar.gz" -C "$WORK" logs bench steps.tsv 2>/dev/null   # kept current if the run is cut
  echo "[gpu_check] $1: $2 (${3}s) $4"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in logs/NAME.log, within LIMIT_S and the budget
step() {
  local name="$1" limit="$2" left t0 rc note
  shift 2
  left=$((BUDGET_S - (SECONDS - START) - 15))   # 15 s kept for the summary
  if [ "$left" -lt 10 ]; then record "$name" fail 0 "not started: the ${BUDGET_S}s budget is spent"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name (limit ${limit}s): $*"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  note="log logs/$name.log"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out after ${limit}s; $note"
  [ "$rc" -ne 0 ] && { tail -n 15 "$WORK/logs/$name.log"; record "$name" fail $((SECONDS - t0)) "exit $rc; $note"; return 1; }
  record "$name" pass $((SECONDS - t0)) "$note"
}

# install_wheels DIR PACKAGE [pip options]: the packages that do not import, from DIR, offline
install_wheels() {
  local dir="$1" pkg="$2" module="${2//-/_}"
  shift 2
  if "$PY" -c "import $module" 2>/dev/null; then echo "$pkg is installed: nothing to do"; return 0; fi
  if [ ! -d "$dir" ]; then
    echo "$pkg is missing and there is no wheel folder at $dir: skipped (fill it with"
    echo "  bash scripts/gpu_check.sh --fetch-wheels where a package index is reachable)"
    return 3
  fi
  echo "$pkg is missing: installing it from $dir ($(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels)"
  "$PY" -m pip install --no-index --no-cache-dir --find-links "$dir" "$@" "$pkg"
}

wheels_step() {
  local t0=$SECONDS rc
  if [ "$MODE" = dry ]; then  # the absent folder, then a fake folder with a probe wheel (pip --dry-run)
    { install_wheels "$WORK/no-such-folder" gpu-check-probe; rc=$?
      [ "$rc" -eq 3 ] && "$PY" "$REPORT" probe-wheel "$WORK/fake-wheels" &&
        install_wheels "$WORK/fake-wheels" gpu-check-probe --dry-run; } > "$WORK/logs/wheels.log" 2>&1
    rc=$?
    grep -q "Would install gpu_check_probe-0.0.0\|Would install gpu-check-probe-0.0.0" "$WORK/logs/wheels.log" || rc=1
    if [ "$rc" -eq 0 ]; then record wheels pass $((SECONDS - t0)) "dry run: absent folder skipped; probe wheel resolved"
    else record wheels fail $((SECONDS - t0)) "dry run: exit $rc; log logs/wheels.log"; fi
    return
  fi
  { install_wheels "$WHEELS" diffusers && install_wheels "$WHEELS" transformers; } > "$WORK/logs/wheels.log" 2>&1
  rc=$?
  case $rc in
    0) record wheels pass $((SECONDS - t0)) "$(tail -n 1 "$WORK/logs/wheels.log" | cut -c1-100)" ;;
    3) record wheels skipped 0 "no wheel folder $WHEELS: diffusers-dependent tests and rows are skipped" ;;
    *) record wheels fail $((SECONDS - t0)) "pip exit $rc; log logs/wheels.log" ;;
  esac
}

bench_subcommands() {  # the bench CLI's subcommands, from its usage line {step,loop,...}
  "$PY" -m diffsampler.bench --help 2>/dev/null | sed -n 's/.*bench {\([^}]*\)}.*/\1/p' | tr ',' ' '
}

echo "[gpu_check] mode $MODE, repository $ROOT, results in $OUT, budget ${BUDGET_S}s"
step env 60 "$PY" "$REPORT" env "$OUT/env.json"
wheels_step
BENCH=("$PY" -m diffsampler.bench)
if [ "$MODE" = dry ]; then
  record build skipped 0 "dry run: no build"
  # the junit writer and reader on one test file (its gpu tests skip without a GPU)
  step pytest 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    tests/test_graphs.py
  export GPU_CHECK_HEADLINE_SIZE="2,4,8,8"
  step bench-step 120 "${BENCH[@]}" step --device cpu --sizes "$GPU_CHECK_HEADLINE_SIZE" --dtypes fp32 \
    --solvers ddim,dpmpp_2m --min-time 0.01 --out "$WORK/bench"
  # the other subcommands' option parsing, in one process (each prints its --help)
  step bench-help 60 "$PY" -c 'import sys
from diffsampler.bench.__main__ import SUBCOMMANDS
for name in sys.argv[1:]:
    try:
        SUBCOMMANDS[name](["--help"])
    except SystemExit as done:
        assert done.code == 0, (name, done.code)' loop lml resample serve
else
  rm -f python/diffsampler/_C.*.so   # a failed build must not leave an older extension to be tested
  step build 360 env DIFFSAMPLER_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" \
    "$PY" setup.py -q build_ext --inplace --build-temp "$WORK/build"
  step pytest 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE --continue-on-collection-errors \
    --junitxml="$OUT/pytest-gpu.xml" tests
  export GPU_CHECK_HEADLINE_SIZE="64,4,128,128"
  step bench-step 120 "${BENCH[@]}" step --device cuda --sizes "8,4,128,128;$GPU_CHECK_HEADLINE_SIZE" \
    --dtypes fp32,bf16 --solvers ddim,dpmpp_2m,unipc --min-time 0.1 --out "$WORK/bench"
  step bench-guided 60 "${BENCH[@]}" step --device cuda --guided --sizes "8,4,128,128;$GPU_CHECK_HEADLINE_SIZE" \
    --dtypes fp32,bf16 --min-time 0.1 --out "$WORK/bench"
  step bench-loop 150 "${BENCH[@]}" loop --device cuda --size 8,4,128,128 --solvers dpmpp_2m --steps 20 \
    --min-time 0.3 --out "$WORK/bench"
  step bench-resample 90 "${BENCH[@]}" resample --device cuda --min-time 0.1 --out "$WORK/bench"
  step bench-lml 60 "${BENCH[@]}" lml --device cuda --skip-quality --out "$WORK/bench"
  step bench-serve 60 "${BENCH[@]}" serve --device cuda --size 4,64,64 --requests 16 --out "$WORK/bench"
fi
if bench_subcommands | grep -qw pipeline; then
  if [ "$MODE" = dry ]; then step bench-pipeline 60 "${BENCH[@]}" pipeline --help
  else step bench-pipeline 120 "${BENCH[@]}" pipeline --device cuda --out "$WORK/bench"; fi
else
  record bench-pipeline skipped 0 "python -m diffsampler.bench has no pipeline subcommand"
fi
record total "$([ "$FAILED" -eq 0 ] && echo pass || echo fail)" $((SECONDS - START)) "mode $MODE"
"$PY" "$REPORT" summary "$WORK" "$OUT" || FAILED=1
exit "$FAILED"

#!/usr/bin/env bash
# The one command for a GPU machine (python3.12 + torch 2.11, no internet, none of our other
# dependencies): install the project from the wheels carried in .whl/, run the gpu-marked tests,
# then bench/train_bench.py on the seed model (Mistral-7B-shaped decoder + CLIP-L frozen, projector
# trained, 1-20 tiles, seq 8192) in every mode; JSON, logs and a summary land in OUT. Each phase has
# its own timeout, so a hang still leaves the logs of everything before it. About 7 minutes.
#
#   bash bench/gpu_check.sh [--dry-run] [OUT]        # OUT: default $OUT, else outputs/gpu_check
#
# --dry-run (any CPU box): the same install into .site, imports from .site (not from a venv),
# the configs compose, the GPU tests collect, the exact commands are printed, a CPU-sized smoke of
# the bench runs, and a GPU recipe without CUDA is refused before anything is built. Exits 0 when
# all of that holds.
#
# Filling .whl/ (on a machine with PyPI; .whl/ and .site/ are git-ignored, never committed):
#   echo /.whl/ >> .git/info/exclude      # already in .gitignore here; needed only in other clones
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       megatron-core==0.19.2 hydra-core==1.3.2 omegaconf==2.3.0
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # an sdist: built into a pure wheel
# (numpy, PyYAML, packaging, transformers, tensorboard, tqdm, pillow, pytest: already on the GPU
# machine; the optional C packer extension is not built there, its pure-Python twin is used.)
# With the device tool, carry .whl:  run(command="bash bench/gpu_check.sh $OUT", carry=[".whl"]).
set -u -o pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/outputs/gpu_check}}"
PY="${PYTHON:-python3}"
SAMPLES="${GPU_CHECK_SAMPLES:-40}"
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
export PYTHONPATH="$ROOT:$ROOT/.site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
FAILED=()

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUTDIR/gpu_check.log"; }

# phase NAME TIMEOUT_S CMD...: run with a timeout, output to OUT/NAME.log (and the terminal tail).
phase() {
  local name="$1" limit="$2"; shift 2
  log "phase $name (timeout ${limit}s): $*"
  local start=$(date +%s) rc
  timeout --kill-after=15 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUTDIR/$name.log"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then log "phase $name TIMED OUT after ${limit}s"; else log "phase $name rc=$rc in $(( $(date +%s) - start ))s"; fi
  [[ $rc -eq 0 ]] || FAILED+=("$name")
  return $rc
}

# ---- 0. the machine -------------------------------------------------------------------------
log "repo $ROOT, out $OUTDIR, python $PY, dry-run=$DRY"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUTDIR/gpu_check.log"
import sys, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  available {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB sm_{p.major}{p.minor}")
if sys.version_info[:2] != (3, 12):
    print("WARNING: megatron-core 0.19.2 wheels are cp312; this is", platform.python_version())
if not torch.__version__.startswith("2.11"):
    print("WARNING: the project pins torch 2.11.*")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv >>"$OUTDIR/gpu_check.log" 2>&1

# ---- 1. install the carried wheels into .site -------------------------------------------------
shopt -s nullglob
WHEELS=(.whl/*.whl)
if [[ ${#WHEELS[@]} -lt 4 ]]; then
  log "ERROR: .whl/ holds ${#WHEELS[@]} wheels; fill it as the header of this script says"; exit 2
fi
if ! phase install 120 "$PY" -m pip install -q --no-index --no-deps --upgrade --target .site "${WHEELS[@]}"; then
  # no usable pip: a wheel is a zip whose top level is what --target would hold
  phase install_unzip 120 "$PY" -c 'import sys, zipfile, shutil; shutil.rmtree(".site", ignore_errors=True); [zipfile.ZipFile(w).extractall(".site") for w in sys.argv[1:]]' "${WHEELS[@]}" || exit 2
  FAILED=()  # the unzip stands in for pip
fi

# ---- 2. imports resolve from .site, configs compose ---------------------------------------------
phase imports 120 "$PY" - <<'EOF' || exit 2
import importlib, os, sys
root = os.getcwd()
site = os.path.join(root, ".site")
for mod in ("megatron.core", "hydra", "omegaconf", "antlr4"):
    m = importlib.import_module(mod)
    where = os.path.dirname(m.__file__)
    print(f"{mod:15s} {getattr(m, '__version__', '')!s:10s} {where}")
    assert where.startswith(site), f"{mod} was imported from {where}, not from {site}"
for mod in ("numpy", "yaml", "packaging", "tqdm", "PIL", "transformers", "safetensors", "tensorboard", "pytest"):
    m = importlib.import_module(mod)
    print(f"{mod:15s} {getattr(m, '__version__', '')!s:10s} {os.path.dirname(m.__file__)}")
import mmtrain.train.loop  # noqa: F401  (the whole training import graph)
from mmtrain.packing import algorithms
print("C packer extension:", "built" if algorithms._fastpack is not None else "absent (pure-Python twin)")
from mmtrain.config import compose
cfg = compose(["model=llava_mistral7b_clip224", "cluster=h100", "packing.seq_length=8192"])
d, v = cfg.model.decoder, cfg.model.vision
print(f"bench model: decoder {d.num_layers}x{d.hidden_size} heads {d.num_attention_heads}/{d.num_query_groups} ffn {d.ffn_hidden_size}; "
      f"ViT {v.num_layers}x{v.hidden_size} {v.image_size}px/{v.patch_size}; freeze lm={cfg.model.freeze_lm} vit={cfg.model.freeze_vit} "
      f"projector={cfg.model.freeze_projector}; seq {cfg.packing.seq_length}; peak {cfg.cluster.peak_tflops_bf16} TFLOP/s; "
      f"precision {cfg.trainer.precision}; perf {cfg.perf}")
assert (d.num_layers, d.hidden_size, d.num_query_groups, d.ffn_hidden_size) == (32, 4096, 8, 14336)
assert cfg.model.freeze_lm and cfg.model.freeze_vit and not cfg.model.freeze_projector
assert (cfg.data.min_tiles, cfg.data.max_tiles) == (1, 20)
r = compose(["recipe=h20_1gpu"])
print(f"recipe h20_1gpu: cluster {r.cluster.name} seq {r.packing.seq_length} buffer {r.packing.buffer_size} precision {r.trainer.precision}")
EOF

TEST_CMD=("$PY" -m pytest -q -p no:cacheprovider -rfEs -m gpu tests/gpu -k "not compiled_layers" --junitxml "$OUTDIR/gpu_tests.xml")
BENCH_ARGS=(--samples "$SAMPLES" --warmup 2 --modes padded,nopad,greedy,packed,packed_compiled --json "$OUTDIR/train_bench.json"
            model=llava_mistral7b_clip224 cluster=h100 packing.seq_length=8192 data.min_tiles=1 data.max_tiles=20
            "trainer.output_dir=$OUTDIR/run")
BENCH_CMD=("$PY" bench/train_bench.py "${BENCH_ARGS[@]}")

if [[ $DRY -eq 1 ]]; then
  # ---- dry run: what a CPU box can check -------------------------------------------------------
  log "would run: ${TEST_CMD[*]}"
  log "would run: ${BENCH_CMD[*]}"
  phase collect 180 "$PY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/gpu
  grep -qE "^[0-9]+(/[0-9]+)? tests? (collected|selected)" "$OUTDIR/collect.log" || { log "gpu tests did not collect"; FAILED+=(collect-count); }
  phase bench_smoke 420 "$PY" bench/train_bench.py --samples 6 --warmup 1 --modes padded,nopad,greedy,packed \
      --json "$OUTDIR/train_bench_smoke.json" model=tiny cluster=cpu trainer.device=cpu packing.seq_length=512 \
      "trainer.output_dir=$OUTDIR/smoke"
  # a GPU cluster config on a machine without CUDA must stop before building the model
  log "phase refusal: python -m mmtrain.train recipe=h20_1gpu (CUDA hidden)"
  CUDA_VISIBLE_DEVICES="" timeout 300 "$PY" -m mmtrain.train recipe=h20_1gpu "trainer.output_dir=$OUTDIR/refused" >"$OUTDIR/refusal.log" 2>&1
  rc=$?
  tail -n 3 "$OUTDIR/refusal.log"
  if [[ $rc -ne 0 ]] && grep -q "no CUDA device is visible" "$OUTDIR/refusal.log" && ! grep -q "run: model=" "$OUTDIR/refusal.log"; then
    log "phase refusal: refused before building (rc=$rc)"
  else
    log "phase refusal FAILED (rc=$rc)"; FAILED+=(refusal)
  fi
  if [[ ${#FAILED[@]} -eq 0 ]]; then log "dry run OK"; exit 0; fi
  log "dry run FAILED: ${FAILED[*]}"; exit 1
fi

# ---- 3. gpu-marked tests --------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "ERROR: no CUDA device visible; use --dry-run on a CPU box"; exit 2
fi
phase gpu_tests 170 "${TEST_CMD[@]}"

# ---- 4. the benchmark (JSON rewritten after every mode) -----------------------------------------
phase train_bench 330 "${BENCH_CMD[@]}"

# ---- 5. summary --------------------------------------------------------------------------------------
"$PY" - "$OUTDIR" <<'EOF' 2>&1 | tee "$OUTDIR/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
p = out / "train_bench.json"
if not p.exists():
    print("no benchmark results"); raise SystemExit(0)
r = json.loads(p.read_text())
print(f"device: {r['device']}  torch {r['torch']}  {r['model']} {r['precision']} seq {r['seq_length']}  "
      f"{r['samples']} samples ({r['mean_tokens_per_sample']:.0f} tokens mean, {r['tiles']} tiles)  attention {r['attention']}\n")
print("| mode | ms / sample | useful TFLOP/s | MFU | padding | data ms / sample | reserved GB | loss | vs padded |")
print("|---|---|---|---|---|---|---|---|---|")
sp = r.get("speedup_vs_padded", {})
for m, x in r["modes"].items():
    print(f"| {m} | {x['ms_per_sample']:.1f} | {x['useful_tflops']:.1f} | {x.get('mfu', 0):.3f} | {x['padding_fraction']:.3f} | "
          f"{x['data_ms_per_sample']:.1f} | {x.get('max_memory_reserved_gb', 0):.1f} | {x['loss']:.5f} | {sp.get(m, 0):.2f}x |")
print(f"\nbest of ours: {r.get('best_ours')}  goal {r.get('goal')}  met {r.get('goal_met')}  loss spread {r.get('loss_spread', 0):.2e}")
EOF
log "done in $(( $(date +%s) - T0 ))s; failed phases: ${FAILED[*]:-none}; results in $OUTDIR"
[[ ${#FAILED[@]} -eq 0 ]]

#!/usr/bin/env bash
# One GPU check for vfpt-deploy, made for a CUDA machine with no network (e.g. an H100 with torch + CUDA,
# plain onnxruntime, and no TensorRT). Under 8 minutes: installs the package from this checkout without
# the network, exports a ViT-B/16 VFPT model (random weights, 10 deep prompts) to ONNX and verifies it
# (onnxruntime's CUDA provider when this onnxruntime has it, else its CPU provider), checks every PyTorch
# form (eager, tokens fold, kv fold) on the GPU in fp32/fp16/bf16 against the CPU fp32 model and times
# them against the plain backbone (benchmarks/prompt_cost_cuda.py), tries TensorRT, runs the test suite
# with the GPU visible, and prints a short table.
#
#   scripts/gpu_check.sh [WORKDIR]       WORKDIR keeps the logs, run.pt, ONNX files, reports and JSON
#   PYTHON=python3.11 WHEELHOUSE=wheels/ scripts/gpu_check.sh   (missing dependencies from local wheels)
#
# Exit status: 0 when every step passed or was skipped for a stated reason, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
WORK=${1:-$(mktemp -d -t vfpt-gpu-check.XXXXXX)}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
ROWS=()
FAILED=0

row() {  # step, result, detail
    ROWS+=("$1|$2|$3")
    [[ $2 == FAIL ]] && FAILED=1
    printf '%-22s %-5s %s\n' "$1" "$2" "$3" >&2
}

vfpt() {  # the CLI without relying on an installed console script
    "$PY" -c 'import sys; from vfpt_deploy.cli import run; sys.argv[0] = "vfpt-deploy"; run()' "$@"
}

# 1. The machine: torch + CUDA, and what onnxruntime offers.
t0=$SECONDS
if ! "$PY" - > "$WORK/env.log" 2>&1 <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(f"torch {torch.__version__} CUDA {torch.version.cuda} | {torch.cuda.get_device_name(0)} "
      f"(cc {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
try:
    import onnxruntime as ort
    print(f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}")
except ImportError:
    print("onnxruntime not installed")
EOF
then
    row "machine" FAIL "$(tail -n 1 "$WORK/env.log")"
    printf '%s\n' "${ROWS[@]}"
    exit 1
fi
row "machine" PASS "$(paste -sd' ' "$WORK/env.log" | cut -c1-150)"

# 2. Install from this checkout, offline: editable without build isolation (needs setuptools here);
#    otherwise a PYTHONPATH shim that reproduces pyproject's package mapping.
t0=$SECONDS
if "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" > "$WORK/install.log" 2>&1; then
    how="pip install --no-deps -e ."
else
    SHIM="$WORK/shim"
    rm -rf "$SHIM" && mkdir -p "$SHIM/vfpt_deploy"
    cp -r "$ROOT"/vfpt_deploy/. "$SHIM/vfpt_deploy/"
    ln -s "$ROOT/exporters" "$SHIM/vfpt_deploy/exporters"
    ln -s "$ROOT/runtime" "$SHIM/vfpt_deploy/runtime"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    how="PYTHONPATH shim (pip install -e failed, see install.log)"
fi
deps="torch timm onnx onnxscript onnxconverter_common onnxruntime typer rich safetensors sklearn PIL numpy pytest"
missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in '$deps'.split() if u.find_spec(m) is None))")
if [[ -n $missing && -n ${WHEELHOUSE:-} ]]; then
    pkgs=${missing//sklearn/scikit-learn}; pkgs=${pkgs//PIL/pillow}; pkgs=${pkgs//onnxconverter_common/onnxconverter-common}
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" $pkgs >> "$WORK/install.log" 2>&1
    missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in '$deps'.split() if u.find_spec(m) is None))")
fi
if [[ -n $missing ]]; then
    row "install" FAIL "missing modules: $missing (set WHEELHOUSE to a folder of wheels)"
    printf '\n%s\n' "${ROWS[@]}"
    exit 1
fi
if "$PY" -c "import vfpt_deploy.exporters.onnx, vfpt_deploy.runtime.tensorrt_runner" >> "$WORK/install.log" 2>&1; then
    row "install" PASS "$how, $((SECONDS - t0))s"
else row "install" FAIL "import failed, see $WORK/install.log"; fi

# 3. A ViT-B/16 run.pt: random backbone, deep prompts scaled up like trained ones, alpha 0.5.
t0=$SECONDS
if "$PY" - "$WORK/run.pt" > "$WORK/run.log" 2>&1 <<'EOF'
import sys
import torch
from vfpt_deploy.backbone import create_backbone
from vfpt_deploy.checkpoint import BackboneInfo, save_run
from vfpt_deploy.config import VFPTConfig
from vfpt_deploy.model import VFPTViT
from vfpt_deploy.runtime.preprocess import Preprocess

torch.manual_seed(0)
model = VFPTViT(create_backbone("vit_base_patch16_224"), 10, VFPTConfig(num_prompts=10, alpha=0.5)).eval()
with torch.no_grad():
    for p in model.tuned_parameters().values():
        p.mul_(20.0)
save_run(sys.argv[1], model, BackboneInfo("vit_base_patch16_224", {}), [f"class{i}" for i in range(10)],
         Preprocess(resize=[224, 224]))
EOF
then row "run.pt (ViT-B/16)" PASS "M=10 deep, alpha 0.5, $((SECONDS - t0))s"
else row "run.pt (ViT-B/16)" FAIL "$(tail -n 1 "$WORK/run.log")"; fi

# 4. Export + verify with onnxruntime: on its CUDA provider when this onnxruntime has one (the provider
#    really used is read back from the verify report, not assumed), else on its CPU provider.
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    prov=cuda
else
    prov=cpu
    row "onnx on CUDA" SKIP "this onnxruntime has no CUDA provider (onnxruntime-gpu not installed): verified on CPU"
fi
for spec in kv:fp32 kv:fp16 tokens:fp32; do
    fold=${spec%%:*}; prec=${spec##*:}; onnx="$WORK/b16.$fold.$prec.onnx"; t0=$SECONDS
    if ! vfpt export --ckpt "$WORK/run.pt" --format onnx --fold "$fold" --precision "$prec" --out "$onnx" --num-random 4 \
            > "$WORK/export.$fold.$prec.log" 2>&1 && [[ ! -f $onnx ]]; then
        row "onnx $fold $prec" FAIL "export: $(grep -m1 -i error "$WORK/export.$fold.$prec.log" | cut -c1-120)"
        continue
    fi
    vfpt verify "$onnx" --ckpt "$WORK/run.pt" --providers "$prov" --report "$onnx.$prov.json" \
        > "$WORK/verify.$fold.$prec.log" 2>&1
    rc=$?
    detail=$("$PY" - "$onnx.$prov.json" <<'EOF' 2>/dev/null || echo "no report (see verify log)"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["comparisons"][0]
print(f"{r['backend']}: max|diff| {c['max_abs']:.2e}, cos {c['min_cosine']:.6f}, top-1 {c['agreement']:.0f}%")
EOF
)
    [[ $prov == cuda && $detail != CUDAExecutionProvider* ]] && rc=1 && detail="not on CUDA -- $detail"
    if [[ $rc == 0 ]]; then row "onnx $fold $prec" PASS "$detail, $((SECONDS - t0))s"
    else row "onnx $fold $prec" FAIL "$detail"; fi
done

# 4b. PyTorch on the GPU: parity of eager / tokens / kv in fp32, fp16, bf16 against the CPU fp32 model,
#     and latency against the plain backbone (interleaved, CUDA events). Full numbers in the JSON.
t0=$SECONDS
# shellcheck disable=SC2086
if timeout 240 "$PY" "$ROOT/benchmarks/prompt_cost_cuda.py" --out "$WORK" ${CUDA_BENCH_ARGS:-} > "$WORK/prompt_cost_cuda.log" 2>&1; then
    detail=$("$PY" - "$WORK/prompt_cost_cuda.json" <<'EOF' 2>&1 | tail -n 1
import json, sys
r = json.load(open(sys.argv[1]))
m = max(r["by_m"], key=int)
par = {(p["form"], p["dtype"]): p for p in r["by_m"][m]["parity"]}
tim = {(t["form"], t["dtype"], t.get("batch")): t for t in r["by_m"][m]["timing"]}
kv32, kv16 = par[("kv", "fp32")], par[("kv", "fp16")]
b = max(t["batch"] for t in r["by_m"][m]["timing"] if "batch" in t)
dt = "fp16" if ("kv", "fp16", b) in tim else "fp32"
print(f"M={m}: kv fp32 max|diff| {kv32['max_abs']:.1e}, kv fp16 cos {kv16['min_cosine']:.5f}; "
      f"{dt} b{b} kv {tim[('kv', dt, b)]['ratio_to_plain']:.2f}x plain ({r['device']})")
EOF
)
    row "torch on CUDA" PASS "$detail, $((SECONDS - t0))s"
else
    row "torch on CUDA" FAIL "$(tail -n 1 "$WORK/prompt_cost_cuda.log" | cut -c1-150)"
fi

# 5. TensorRT: build + verify when it is installed; otherwise the one-line reason (expected on the H100).
t0=$SECONDS
"$PY" - "$WORK" > "$WORK/tensorrt.log" 2>&1 <<'EOF'
import sys
from pathlib import Path
from vfpt_deploy.checkpoint import load_run
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.exporters.tensorrt import BuildSettings, build_engine, check_trt_available

work = Path(sys.argv[1])
try:
    check_trt_available("trt")
except VFPTError as e:
    print(f"SKIP {e}")
    sys.exit(0)
from vfpt_deploy.verify import verify_artifact

res = build_engine(work / "b16.kv.fp16.onnx", work / "b16.kv.fp16.engine",
                   BuildSettings(flavor="trt", precision="fp16", max_batch=16, timing_cache=work / "timing.cache"))
rep = verify_artifact(res.engine_path, load_run(work / "run.pt"), num_random=16)
c = rep.comparisons[0]
print(f"{'PASS' if rep.passed else 'FAIL'} TensorRT {res.sidecar['tensorrt']['version']} fp16 engine "
      f"{res.engine_bytes / 2**20:.0f} MiB built in {res.build_seconds:.0f}s: max|diff| {c.max_abs:.2e}, "
      f"cos {c.min_cosine:.6f}")
EOF
line=$(tail -n 1 "$WORK/tensorrt.log")
case $line in
    PASS*) row "tensorrt engine" PASS "${line#PASS }, $((SECONDS - t0))s" ;;
    SKIP*) row "tensorrt engine" SKIP "${line#SKIP }" ;;
    *) row "tensorrt engine" FAIL "${line#FAIL }" ;;
esac

# 6. The test suite (slow ViT-B tests excluded) with the GPU visible: code paths that pick CUDA when it is
#    present run here and nowhere else. Tests needing packages this machine lacks skip with their reason.
t0=$SECONDS
# -v prints each result as it lands, so the names of failures survive a timeout. Few workers: each test
# already uses every CPU for torch and onnxruntime (15 workers on 16 cores got through 85% in 270 s).
par=""; "$PY" -c "import xdist" 2>/dev/null && par="-n 4"
# shellcheck disable=SC2086
timeout "${PYTEST_TIMEOUT:-240}" "$PY" -m pytest -v -m "not slow" $par -rfE -p no:cacheprovider -p no:benchmark \
    "$ROOT/tests" > "$WORK/pytest.log" 2>&1
rc=$?
summary=$(tail -n 1 "$WORK/pytest.log" | tr -d '=' | sed 's/^ *//')
if [[ $rc == 0 || $rc == 5 ]]; then row "pytest (GPU visible)" PASS "$summary, $((SECONDS - t0))s"
else row "pytest (GPU visible)" FAIL "rc $rc: $summary"; fi
grep -E 'FAILED|ERROR' "$WORK/pytest.log" | grep -v '^E ' | head -n 20 | sed 's/^/    /' >&2

printf '\n%-22s %-5s %s\n' "step" "" "result (logs in $WORK)"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c <<< "$r"
    printf '%-22s %-5s %s\n' "$a" "$b" "$c"
done
exit $FAILED

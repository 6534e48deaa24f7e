#!/usr/bin/env bash
# One GPU check for vfpt-deploy, made for a CUDA machine with no network (e.g. an H100 with torch + CUDA,
# onnxruntime, and no TensorRT). Under 5 minutes: installs the package from this checkout without the
# network, exports a ViT-B/16 VFPT model (random weights, 10 deep prompts) to ONNX, verifies it on the GPU
# with onnxruntime's CUDA provider, tries TensorRT, runs the gpu-marked tests, and prints a short table.
#
#   scripts/gpu_check.sh [WORKDIR]       WORKDIR keeps the logs, run.pt, ONNX files and verify reports
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

# 4. Export + verify on the GPU with onnxruntime's CUDA provider: the provider really used is read back
#    from the verify report, not assumed.
for spec in kv:fp32 kv:fp16 tokens:fp32; do
    fold=${spec%%:*}; prec=${spec##*:}; onnx="$WORK/b16.$fold.$prec.onnx"; t0=$SECONDS
    if ! vfpt export --ckpt "$WORK/run.pt" --format onnx --fold "$fold" --precision "$prec" --out "$onnx" --num-random 4 \
            > "$WORK/export.$fold.$prec.log" 2>&1 && [[ ! -f $onnx ]]; then
        row "onnx $fold $prec" FAIL "export: $(grep -m1 -i error "$WORK/export.$fold.$prec.log" | cut -c1-120)"
        continue
    fi
    vfpt verify "$onnx" --ckpt "$WORK/run.pt" --providers cuda --report "$onnx.gpu.json" \
        > "$WORK/verify.$fold.$prec.log" 2>&1
    rc=$?
    detail=$("$PY" - "$onnx.gpu.json" <<'EOF' 2>/dev/null || echo "no report (see verify log)"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["comparisons"][0]
print(f"{r['backend']}: max|diff| {c['max_abs']:.2e}, cos {c['min_cosine']:.6f}, top-1 {c['agreement']:.0f}%")
EOF
)
    [[ $detail != CUDAExecutionProvider* ]] && rc=1 && detail="not on CUDA -- $detail"
    if [[ $rc == 0 ]]; then row "onnx $fold $prec" PASS "$detail, $((SECONDS - t0))s"
    else row "onnx $fold $prec" FAIL "$detail"; fi
done

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

# 6. The gpu-marked tests (each skips with its reason where a piece is missing).
t0=$SECONDS
timeout 200 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider "$ROOT/tests" > "$WORK/pytest.log" 2>&1
rc=$?
summary=$(tail -n 1 "$WORK/pytest.log" | tr -d '=' | sed 's/^ *//')
if [[ $rc == 0 || $rc == 5 ]]; then row "pytest -m gpu" PASS "$summary"
else row "pytest -m gpu" FAIL "rc $rc: $summary"; fi
grep -E '^SKIPPED' "$WORK/pytest.log" | sort | uniq -c | sed 's/^/    /' >&2

printf '\n%-22s %-5s %s\n' "step" "" "result (logs in $WORK)"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c <<< "$r"
    printf '%-22s %-5s %s\n' "$a" "$b" "$c"
done
exit $FAILED

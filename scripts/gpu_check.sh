#!/usr/bin/env bash
# The GPU check of vfpt-deploy (issue 20), in two halves.
#
# HERE (a machine with the network, no GPU needed):
#   scripts/gpu_check.sh prepare    download onnxruntime-gpu 1.31.1 for the GPU image's Python 3.12 (cp312,
#                                   manylinux_2_28 x86_64), check its size and sha256, split it into 55 MiB parts
#                                   (.ortgpu1/ .. .ortgpu5/, git-ignored, one carried per device call), fetch
#                                   a small wheelhouse for the serve step and pytest-xdist (.gpuserve/), then
#                                   print the numbered device calls: command, carry list, timeout
#   scripts/gpu_check.sh plan       print those calls again (after prepare)
#
# ON THE GPU MACHINE (the device tool runs each numbered call in the repository root; $OUT comes back):
#   scripts/gpu_check.sh device STEP...   run the steps in order; each prints "gpu_check: STEP STATUS (s) detail"
#                                         as it lands and appends its JSON line to $OUT/steps.jsonl
#   part N     part N arrived intact (size + sha256); earlier parts still on the machine
#   wheels     the serve/xdist wheelhouse arrived intact (its own call: with a part it passes 64 MiB)
#   install    join the parts, check the wheel's sha256, pip install --no-deps --target .gpucheck/ort, hide the
#              image's plain onnxruntime (vfpt-deploy refuses two onnxruntime flavours side by side), put
#              .gpucheck/ort first on PYTHONPATH, onnxruntime.preload_dlls() (CUDA/cuDNN from the image's
#              nvidia-* packages) in every Python started after it, install this checkout (no deps), install
#              the missing serve/xdist wheels into .gpucheck/extra; then a session on the CUDA provider
#   verify     ViT-B/16 (random weights) with M=50 deep prompts: export kv fp32 and fp16 (the CLI's own
#              verification), then `vfpt-deploy verify --providers cuda` against PyTorch, and a TF32 probe
#              (onnxruntime's CUDA EP runs fp32 MatMuls in TF32 unless use_tf32=0)
#   golden     `vfpt-deploy verify ARTIFACT --providers cuda` without --ckpt (the torch-free golden-set replay);
#              skipped, with the reason, where this checkout's verify still needs --ckpt
#   serve      `vfpt-deploy serve ARTIFACT --providers cuda` answers one V2 REST request (an image)
#   bench      `vfpt-deploy bench` torch-folded (fp16) vs ort-cuda vs ort-cuda-graph on the kv fp16 ONNX, then
#              benchmarks/runtime_cost.py: PyTorch eager vs onnxruntime (IO binding, with and without CUDA
#              graphs), plain backbone vs kv fold, fp16, batch 1/8/64, ratios in one interleaved run
#   torchcost  benchmarks/prompt_cost_cuda.py at M=50: the PyTorch kv fold through fused attention, re-measured
#   pytest     the test suite (not slow) with the GPU visible, -v, failures by name (PYTEST_TIMEOUT, default 300 s;
#              PYTEST_WORKERS, default 8 when pytest-xdist imports; PYTEST_ARGS, default tests/)
#   pytest-bg  the same in the background: the steps after it run meanwhile, and the run waits for it at the end
#   Without a GPU (or before `install`) every step fails or skips at once with the reason; nothing hangs.
#
#   scripts/gpu_check.sh steps      list the steps
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh device verify golden serve bench torchcost pytest
#       a dry run of the steps' own code on a CPU machine: the checkout's Python as it is (no install), a tiny
#       ViT, the CPU provider and device, fp32 benchmarks. It checks the script, not the GPU.
#
# Exit status: 0 when every step passed or was skipped for a stated reason, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}

ORT_VERSION=1.31.1
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
WHEEL_BYTES=255569273
WHEEL_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
PART_SIZE=55M
MIB=1048576
CARRY_LIMIT_MIB=60            # what one call may carry besides the checkout (the device tool's limit is 64 MiB)
DL=.gpudl                     # here: the downloads (never carried)
SERVE=.gpuserve               # serve + pytest-xdist wheels for cp312 (carried once)
CHECK=.gpucheck               # on the GPU machine: install targets, work files (kept while the machine is warm)
SERVE_PINS=(mlserver==1.7.1 pytest-xdist)
# Left out of the wheelhouse: the GPU image has them (numpy, onnx's protobuf and ml_dtypes, pip's setuptools).
SERVE_SKIP='^(numpy|ml_dtypes|protobuf|setuptools)-'
STEPS="part wheels install verify golden serve bench torchcost pytest pytest-bg"

die() { echo "gpu_check: error: $*" >&2; exit 1; }

nparts() { find . -maxdepth 1 -type d -name '.ortgpu[0-9]*' | wc -l; }

# -- here ---------------------------------------------------------------------------------------------
prepare() {
    if ! command -v split > /dev/null || ! command -v sha256sum > /dev/null; then
        die "needs split and sha256sum (coreutils)"
    fi
    mkdir -p "$DL"
    local whl="$DL/$WHEEL"
    if [[ ! -f $whl ]] || [[ $(sha256sum < "$whl" | cut -d' ' -f1) != "$WHEEL_SHA256" ]]; then
        rm -f "$whl"
        echo "downloading onnxruntime-gpu $ORT_VERSION for cp312 manylinux_2_28 x86_64 ..."
        # manylinux_2_28 is the wheel's tag: pip refuses it under --platform manylinux_2_27_x86_64.
        "$PY" -m pip download "onnxruntime-gpu==$ORT_VERSION" --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 -d "$DL" -q \
            || die "pip download of onnxruntime-gpu $ORT_VERSION failed (network? pip index?)"
    fi
    [[ -f $whl ]] || die "pip downloaded something else than $WHEEL: $(ls "$DL")"
    local bytes sha
    bytes=$(stat -c %s "$whl")
    sha=$(sha256sum < "$whl" | cut -d' ' -f1)
    [[ $bytes == "$WHEEL_BYTES" ]] || die "$WHEEL is $bytes bytes, expected $WHEEL_BYTES: a different build; update WHEEL_* here"
    [[ $sha == "$WHEEL_SHA256" ]] || die "$WHEEL has sha256 $sha, expected $WHEEL_SHA256"
    echo "ok: $WHEEL, $bytes bytes, sha256 $sha"

    rm -rf .ortgpu[0-9]* "$DL/parts" && mkdir -p "$DL/parts"
    split -b "$PART_SIZE" -d -a 2 "$whl" "$DL/parts/p" || die "split failed"
    local i=0 p
    for p in "$DL"/parts/p*; do
        i=$((i + 1))
        mkdir -p ".ortgpu$i"
        mv "$p" ".ortgpu$i/part"
        echo "$(sha256sum < ".ortgpu$i/part" | cut -d' ' -f1) $(stat -c %s ".ortgpu$i/part") $i" > ".ortgpu$i/part.sha256"
    done
    rmdir "$DL/parts"
    echo "ok: $i parts of at most $PART_SIZE: $(for d in .ortgpu[0-9]*; do printf '%s ' "$d"; done)"

    if [[ ${SERVE_WHEELS:-1} == 1 ]]; then
        rm -rf "$SERVE" "$DL/serve" && mkdir -p "$SERVE" "$DL/serve"
        echo "downloading the serve/xdist wheelhouse (${SERVE_PINS[*]}) for cp312 ..."
        if "$PY" -m pip download "${SERVE_PINS[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                --platform any -d "$DL/serve" -q; then
            local w
            for w in "$DL"/serve/*.whl; do
                [[ $(basename "$w") =~ $SERVE_SKIP ]] || cp "$w" "$SERVE/"
            done
            (cd "$SERVE" && sha256sum -- *.whl > SHA256SUMS)
            echo "ok: $SERVE/ holds $(find "$SERVE" -name '*.whl' | wc -l) wheels, $(du -sm "$SERVE" | cut -f1) MiB"
        else
            rm -rf "$SERVE"
            echo "warning: the serve wheelhouse could not be downloaded: the serve step will skip on the GPU" >&2
        fi
    fi
    plan
}

plan() {
    local n i k mib serve_mib=0
    n=$(nparts)
    [[ $n -gt 0 ]] || die "nothing prepared: run scripts/gpu_check.sh prepare first"
    [[ -d $SERVE ]] && serve_mib=$(( ($(du -sb "$SERVE" | cut -f1) + MIB - 1) / MIB ))
    echo
    echo "Device calls, back to back (the machine goes back after ~30 s idle; a later call then finds a bare"
    echo "machine and the part calls must start again). Each: run(command=..., carry=[...], timeout_s=...)."
    i=0
    for ((k = 1; k < n; k++)); do
        i=$((i + 1))
        mib=$(( ($(stat -c %s ".ortgpu$k/part") + MIB - 1) / MIB ))
        printf '%2d. command="scripts/gpu_check.sh device part %d"  carry=[".ortgpu%d"]  timeout_s=60   (%d MiB)\n' \
            "$i" "$k" "$k" "$mib"
    done
    if [[ $serve_mib -gt $CARRY_LIMIT_MIB ]]; then
        die "$SERVE/ is $serve_mib MiB, over the $CARRY_LIMIT_MIB MiB one call may carry: trim SERVE_PINS or SERVE_SKIP"
    fi
    if [[ $serve_mib -gt 0 ]]; then  # its own call: with the last part it would pass what one call carries
        i=$((i + 1))
        printf '%2d. command="scripts/gpu_check.sh device wheels"  carry=["%s"]  timeout_s=60   (%d MiB)\n' \
            "$i" "$SERVE" "$serve_mib"
    fi
    i=$((i + 1))
    mib=$(( ($(stat -c %s ".ortgpu$n/part") + MIB - 1) / MIB ))
    printf '%2d. command="scripts/gpu_check.sh device part %d install bench torchcost"  carry=[".ortgpu%d"]  timeout_s=540   (%d MiB)\n' \
        "$i" "$n" "$n" "$mib"
    i=$((i + 1))
    printf '%2d. command="PYTEST_TIMEOUT=T scripts/gpu_check.sh device pytest-bg verify golden serve"  carry=[]  timeout_s=B-30\n' "$i"
    echo
    echo "Then give_back. B: status' budget_left_s just before the last call; T = min(420, B - 90), the test suite's"
    echo "share (verify, golden and serve, about 150 s, run while it does). With B under 250, drop pytest-bg."
    echo "The timings (bench, torchcost) run alone, right after install, so that they come back first."
    echo "Results: each call's \$OUT (steps.jsonl, one JSON per step, logs/)."
}

# -- on the GPU machine -------------------------------------------------------------------------------
OUT=${OUT:-$ROOT/$CHECK/out}
DRY=${GPU_CHECK_DRY:-0}
if [[ $DRY == 1 ]]; then
    PROV=cpu PROV_FULL=CPUExecutionProvider DEV=cpu MODEL=tiny BENCH_DTYPE=fp32 M=4
else
    PROV=cuda PROV_FULL=CUDAExecutionProvider DEV=cuda MODEL=vit_base_patch16_224 BENCH_DTYPE=fp16 M=50
fi
WORK=$ROOT/$CHECK/work
LOGS=$OUT/logs
FAILED=0
BG_PIDS=()

jpy() { "$PY" -I "$@"; }  # isolated: no PYTHONPATH, no sitecustomize preload (JSON helpers only)

record() {  # step status detail seconds [json-file merged into the record]
    local step=$1 status=$2 detail=$3 secs=$4 extra=${5:-}
    [[ $status == FAIL ]] && FAILED=1
    printf 'gpu_check: %-10s %-4s (%ss) %s\n' "$step" "$status" "$secs" "$detail"
    jpy - "$step" "$status" "$detail" "$secs" "$extra" "$OUT" <<'EOF'
import json, os, sys, time
step, status, detail, secs, extra, out = sys.argv[1:7]
rec = {"step": step, "status": status, "detail": detail, "seconds": int(secs),
       "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
if extra and os.path.isfile(extra):
    try:
        rec["data"] = json.load(open(extra))
    except ValueError as e:
        rec["data_error"] = f"{extra}: {e}"
with open(os.path.join(out, "steps.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")
with open(os.path.join(out, f"{step}.json"), "w") as f:
    json.dump(rec, f, indent=1)
EOF
}

installed() { [[ -f $ROOT/$CHECK/env.sh || $DRY == 1 ]]; }

need_install() {  # step: fail at once (with the reason) when `install` has not run on this machine
    if ! installed; then
        record "$1" FAIL "onnxruntime-gpu is not installed on this machine ($CHECK/env.sh missing): run the part calls and 'install' first (the machine may have been given back between calls)" 0
        return 1
    fi
    [[ $DRY == 1 ]] && return 0
    # shellcheck disable=SC1090,SC1091
    source "$ROOT/$CHECK/env.sh"
}

need_gpu() {  # step
    [[ $DRY == 1 ]] && return 0
    if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        record "$1" SKIP "torch sees no CUDA GPU on this machine" 0
        return 1
    fi
}

# The CLI, whichever way the checkout was installed (an array, so that `timeout` can run it).
VFPT=("$PY" -c 'import sys; from vfpt_deploy.cli import run; sys.argv[0] = "vfpt-deploy"; run()')

step_part() {  # N
    local k=$1 t0=$SECONDS sum size want_sum want_size missing=""
    [[ $k =~ ^[0-9]+$ ]] || { record part FAIL "part needs a number, got '$k'" 0; return; }
    if [[ ! -f .ortgpu$k/part || ! -f .ortgpu$k/part.sha256 ]]; then
        record "part$k" FAIL ".ortgpu$k/part did not arrive: carry \".ortgpu$k\" in this call" 0
        return
    fi
    read -r want_sum want_size _ < ".ortgpu$k/part.sha256"
    size=$(stat -c %s ".ortgpu$k/part")
    sum=$(sha256sum < ".ortgpu$k/part" | cut -d' ' -f1)
    for ((j = 1; j < k; j++)); do [[ -f .ortgpu$j/part ]] || missing="$missing $j"; done
    if [[ $sum != "$want_sum" || $size != "$want_size" ]]; then
        record "part$k" FAIL "part $k is $size bytes, sha256 $sum; expected $want_size, $want_sum" $((SECONDS - t0))
    elif [[ -n $missing ]]; then
        record "part$k" FAIL "parts$missing are gone: the machine was given back between calls; start again at call 1" $((SECONDS - t0))
    else
        record "part$k" PASS "$size bytes, sha256 ok; parts 1..$k on the machine" $((SECONDS - t0))
    fi
}

step_wheels() {  # the serve/xdist wheelhouse arrived intact
    local t0=$SECONDS
    if [[ ! -f $SERVE/SHA256SUMS ]]; then
        record wheels FAIL "$SERVE/ did not arrive: carry \"$SERVE\" in this call" 0
    elif (cd "$SERVE" && sha256sum --quiet -c SHA256SUMS) > "$LOGS/wheels.log" 2>&1; then
        record wheels PASS "$(wc -l < "$SERVE/SHA256SUMS") wheels, sha256 ok" $((SECONDS - t0))
    else
        record wheels FAIL "damaged wheels: $(head -n 3 "$LOGS/wheels.log" | tr '\n' ' ')" $((SECONDS - t0))
    fi
}

step_install() {
    local t0=$SECONDS k n whl="$ROOT/$CHECK/$WHEEL" sum ver
    mkdir -p "$ROOT/$CHECK"
    [[ $DRY == 1 ]] && { record install SKIP "dry run: the checkout's own Python and onnxruntime" 0; return; }
    ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1)
    if [[ $ver != 3.12 ]]; then
        record install FAIL "$PY is Python $ver; the wheel is cp312 (set PYTHON=python3.12)" 0
        return
    fi
    n=$(nparts)
    for ((k = 1; k <= n; k++)); do
        [[ -f .ortgpu$k/part ]] || { record install FAIL "part $k is missing: the machine was given back? start again at call 1" 0; return; }
    done
    [[ $n -gt 0 ]] || { record install FAIL "no parts on this machine: run the part calls first" 0; return; }
    for ((k = 1; k <= n; k++)); do cat ".ortgpu$k/part"; done > "$whl"
    sum=$(sha256sum < "$whl" | cut -d' ' -f1)
    if [[ $sum != "$WHEEL_SHA256" ]]; then
        record install FAIL "the joined wheel's sha256 is $sum, expected $WHEEL_SHA256" $((SECONDS - t0))
        return
    fi
    rm -rf "$ROOT/$CHECK/ort" "$ROOT/$CHECK/site" "$ROOT/$CHECK/extra"
    if ! PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps --target "$ROOT/$CHECK/ort" "$whl" > "$LOGS/install.log" 2>&1; then
        record install FAIL "pip install --target failed: $(tail -n 1 "$LOGS/install.log")" $((SECONDS - t0))
        return
    fi
    rm -f "$whl"
    # The image's plain onnxruntime would stay visible beside onnxruntime-gpu (two dist-infos, one module):
    # vfpt-deploy's one-flavour guard (extras.check_one_onnxruntime) refuses that, so it is uninstalled.
    local hidden="none there"
    if env -u PYTHONPATH "$PY" -m pip show onnxruntime > /dev/null 2>&1; then
        if env -u PYTHONPATH "$PY" -m pip uninstall -y onnxruntime >> "$LOGS/install.log" 2>&1; then
            hidden="uninstalled the image's onnxruntime"
        else
            record install FAIL "cannot uninstall the image's plain onnxruntime (see logs/install.log)" $((SECONDS - t0))
            return
        fi
    fi
    # preload_dlls() in every Python started from here on (sitecustomize), and the nvidia-* library folders
    # on LD_LIBRARY_PATH as a second way for onnxruntime's CUDA provider to find libcublas/libcudnn.
    mkdir -p "$ROOT/$CHECK/site"
    cat > "$ROOT/$CHECK/site/sitecustomize.py" <<'EOF'
import os
if os.environ.get("VFPT_GPU_CHECK_PRELOAD") == "1":
    import contextlib, io
    said = io.StringIO()
    try:  # preload_dlls prints what it cannot load: kept in a log, never on the terminal
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            import onnxruntime
            onnxruntime.preload_dlls()
    except Exception as e:
        said.write(f"{type(e).__name__}: {e}\n")
    if said.getvalue():
        with open(os.path.join(os.path.dirname(__file__), "preload.log"), "a") as f:
            f.write(f"pid {os.getpid()}: {said.getvalue()}")
EOF
    local libdirs
    libdirs=$(env -u PYTHONPATH "$PY" - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for so in glob.glob(os.path.join(sp, "nvidia", "**", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
EOF
)
    cat > "$ROOT/$CHECK/env.sh" <<EOF
export PYTHONPATH="$ROOT/$CHECK/site:$ROOT/$CHECK/ort:$ROOT/$CHECK/extra\${PYTHONPATH:+:\$PYTHONPATH}"
export VFPT_GPU_CHECK_PRELOAD=1 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
EOF
    if [[ -n $libdirs ]]; then
        echo "export LD_LIBRARY_PATH=\"$libdirs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"" >> "$ROOT/$CHECK/env.sh"
    fi
    # shellcheck disable=SC1090,SC1091
    source "$ROOT/$CHECK/env.sh"
    local how="pip install --no-deps -e ."
    if ! PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >> "$LOGS/install.log" 2>&1; then
        how="checkout on PYTHONPATH (pip install -e failed, see logs/install.log)"
        local shim="$ROOT/$CHECK/shim"
        rm -rf "$shim" && mkdir -p "$shim/vfpt_deploy"
        cp -r "$ROOT"/vfpt_deploy/. "$shim/vfpt_deploy/"
        ln -s "$ROOT/exporters" "$shim/vfpt_deploy/exporters"
        ln -s "$ROOT/runtime" "$shim/vfpt_deploy/runtime"
        echo "export PYTHONPATH=\"\$PYTHONPATH:$shim\"" >> "$ROOT/$CHECK/env.sh"
        export PYTHONPATH="$PYTHONPATH:$shim"
    fi
    # Serve and pytest-xdist wheels: only the distributions this Python lacks, into their own folder.
    local extra="no $SERVE/ carried"
    if [[ -d $SERVE ]]; then
        local todo
        todo=$(VFPT_GPU_CHECK_PRELOAD=0 "$PY" - "$SERVE" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(w)
EOF
)
        local -a wheels
        mapfile -t wheels <<< "$todo"
        if [[ -z $todo ]]; then
            extra="every serve/xdist wheel's package is already here"
        elif PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps --target "$ROOT/$CHECK/extra" "${wheels[@]}" >> "$LOGS/install.log" 2>&1; then
            extra="${#wheels[@]} serve/xdist wheels into $CHECK/extra"
        else
            extra="serve/xdist wheels failed to install (see logs/install.log)"
        fi
    fi
    # Proof: onnxruntime-gpu is the one onnxruntime, and a session really runs on the CUDA provider.
    "$PY" - "$OUT/install_probe.json" > "$LOGS/install_probe.log" 2>&1 <<'EOF'
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from vfpt_deploy.extras import installed_ort_distributions
    out.update(onnxruntime=ort.__version__, onnxruntime_file=ort.__file__,
               distributions=installed_ort_distributions(), available=ort.get_available_providers())
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, 64]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [64, 64])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    s = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    c = s.run(None, {"a": a, "b": a})[0]
    out.update(session_providers=s.get_providers(), max_abs_vs_numpy=float(np.abs(c - a @ a).max()))
    maps = open("/proc/self/maps").read().split("\n")
    out["loaded"] = sorted({l.split()[-1] for l in maps if any(k in l for k in ("libcublas", "libcudnn.so", "libcudart"))})
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0),
               capability=".".join(map(str, torch.cuda.get_device_capability(0))))
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
EOF
    local verdict
    verdict=$(jpy - "$OUT/install_probe.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"FAIL|no probe result ({e})"); sys.exit()
if "error" in r and "session_providers" not in r:
    print(f"FAIL|{r['error'][:200]}"); sys.exit()
used = r.get("session_providers", [])
ok = used[:1] == ["CUDAExecutionProvider"] and r.get("distributions") == ["onnxruntime-gpu"]
print(f"{'PASS' if ok else 'FAIL'}|onnxruntime {r.get('onnxruntime')} {r.get('distributions')}, session on {used}"
      f"{'' if ok else ' (CUDA provider not used: logs/install_probe.log)'}, "
      f"{r.get('gpu', '?')} cc {r.get('capability', '?')}, torch {r.get('torch', '?')} CUDA {r.get('torch_cuda', '?')}")
EOF
)
    record install "${verdict%%|*}" "${verdict#*|}; $how; $hidden; $extra" $((SECONDS - t0)) "$OUT/install_probe.json"
}

make_run() {  # the ViT-B/16 run.pt with M=50 deep prompts (kept in WORK for the later steps)
    [[ -f $WORK/run.pt ]] && return 0
    "$PY" - "$WORK/run.pt" "$MODEL" "$M" > "$LOGS/run_pt.log" 2>&1 <<'EOF'
import sys
import torch
from vfpt_deploy.models.backbone import create_backbone
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
from vfpt_deploy.models.config import VFPTConfig
from vfpt_deploy.models.vit.model import VFPTViT
from vfpt_deploy.runtime.preprocess import Preprocess

name, m = sys.argv[2], int(sys.argv[3])
kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2} if name == "tiny" else {}
timm_name = "vit_tiny_patch16_224" if name == "tiny" else name
torch.manual_seed(0)
model = VFPTViT(create_backbone(timm_name, **kwargs), 10, VFPTConfig(num_prompts=m, alpha=0.5)).eval()
with torch.no_grad():
    for p in model.tuned_parameters().values():
        p.mul_(20.0)  # trained prompts are far from their initialisation
save_run(sys.argv[1], model, BackboneInfo(timm_name, kwargs), [f"class{i}" for i in range(10)],
         Preprocess(resize=list(model.img_size)))
EOF
}

summarize_verify() {  # report.json -> one line
    jpy - "$1" <<'EOF' 2>/dev/null || echo "no report"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["comparisons"][0]
print(f"{r['backend']}: max|diff| {c['max_abs']:.2e}, cos {c['min_cosine']:.6f}, top-1 {c['agreement']:.0f}%, "
      f"{'passed' if r['passed'] else 'FAILED: ' + '; '.join(c.get('failures') or [])}")
EOF
}

make_onnx() {  # PREC: WORK/kv50.PREC.onnx from the run.pt (once; the outcome of the CLI's export in .note)
    local prec=$1 onnx=$WORK/kv50.$1.onnx rc note
    [[ -f $onnx ]] && return 0
    # The CLI export verifies on the default providers (CUDA here) and writes nothing if that fails.
    timeout 240 "${VFPT[@]}" export --ckpt "$WORK/run.pt" --format onnx --fold kv --precision "$prec" --out "$onnx" \
        --num-random 16 > "$LOGS/export_$prec.log" 2>&1
    rc=$?
    cp -f "$onnx.verify.json" "$OUT/export_kv50_$prec.verify.json" 2>/dev/null
    note="export rc $rc ($(summarize_verify "$OUT/export_kv50_$prec.verify.json"))"
    if [[ ! -f $onnx ]]; then  # written anyway (no verification), so that the checks after it have a file
        timeout 180 "$PY" -c 'import sys; from vfpt_deploy.artifacts.checkpoint import load_run; from vfpt_deploy.exporters.onnx import export_onnx; export_onnx(load_run(sys.argv[1]), sys.argv[2], fold="kv", precision=sys.argv[3])' \
            "$WORK/run.pt" "$onnx" "$prec" >> "$LOGS/export_$prec.log" 2>&1
        note="$note; written without verification for the checks after it"
    fi
    echo "$note" > "$WORK/kv50.$prec.note"
    [[ -f $onnx ]]
}

step_verify() {
    local t0=$SECONDS
    need_install verify && need_gpu verify || return
    mkdir -p "$WORK"
    make_run || { record verify FAIL "building the $MODEL run.pt failed: $(tail -n 1 "$LOGS/run_pt.log")" $((SECONDS - t0)); return; }
    local prec onnx rc detail export_note
    for prec in fp32 fp16; do
        t0=$SECONDS
        onnx=$WORK/kv50.$prec.onnx
        make_onnx "$prec"
        export_note=$(cat "$WORK/kv50.$prec.note" 2>/dev/null)
        [[ -f $onnx ]] || { record "verify_$prec" FAIL "no ONNX: $(tail -n 1 "$LOGS/export_$prec.log" | cut -c1-200)" $((SECONDS - t0)); continue; }
        local report=$OUT/verify_kv50_${prec}_$PROV.json
        timeout 180 "${VFPT[@]}" verify "$onnx" --ckpt "$WORK/run.pt" --providers "$PROV" --num-random 16 \
            --report "$report" > "$LOGS/verify_$prec.log" 2>&1
        rc=$?
        detail=$(summarize_verify "$report")
        [[ $detail == "$PROV_FULL"* ]] || { rc=1; detail="not on $PROV_FULL: $detail $(tail -n 1 "$LOGS/verify_$prec.log" | cut -c1-160)"; }
        if [[ $rc == 0 ]]; then record "verify_$prec" PASS "$detail; $export_note" $((SECONDS - t0)) "$report"
        else record "verify_$prec" FAIL "$detail; $export_note" $((SECONDS - t0)) "$report"; fi
    done
    # TF32: onnxruntime's CUDA EP runs float32 MatMul/Conv in TF32 by default (use_tf32=1) on Ampere and newer.
    t0=$SECONDS
    [[ -f $WORK/kv50.fp32.onnx ]] || return
    [[ $DRY == 1 ]] && { record tf32_probe SKIP "dry run: no CUDA provider" 0; return; }
    timeout 180 "$PY" - "$WORK/kv50.fp32.onnx" "$OUT/tf32_probe.json" > "$LOGS/tf32_probe.log" 2>&1 <<'EOF'
import json, sys
import numpy as np
from vfpt_deploy.runtime.onnx_runner import make_session
x = np.random.default_rng(0).standard_normal((16, 3, 224, 224), dtype=np.float32)  # ViT-B/16's input
out = {}
for name, prov, opts in (("cpu", ["cpu"], None), ("cuda_tf32_default", ["cuda"], None),
                         ("cuda_tf32_off", ["cuda"], {"cuda": {"use_tf32": 0}})):
    s = make_session(sys.argv[1], prov, provider_options=opts)
    out[name] = (s.get_providers(), s.run(None, {"images": x})[0].astype(np.float64))
ref = out["cpu"][1]
res = {k: {"providers": v[0], "max_abs_vs_cpu_ep": float(np.abs(v[1] - ref).max())} for k, v in out.items()}
res["logit_max_abs"] = float(np.abs(ref).max())
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(json.dumps(res))
EOF
    if [[ -f $OUT/tf32_probe.json ]]; then
        record tf32_probe PASS "$(jpy -c 'import json,sys; r=json.load(open(sys.argv[1])); print("max|ORT CUDA - ORT CPU| fp32 logits: TF32 default %.2e, use_tf32=0 %.2e (|logit| up to %.1f)" % (r["cuda_tf32_default"]["max_abs_vs_cpu_ep"], r["cuda_tf32_off"]["max_abs_vs_cpu_ep"], r["logit_max_abs"]))' "$OUT/tf32_probe.json")" $((SECONDS - t0)) "$OUT/tf32_probe.json"
    else
        record tf32_probe FAIL "$(tail -n 1 "$LOGS/tf32_probe.log" | cut -c1-200)" $((SECONDS - t0))
    fi
}

step_golden() {
    local t0=$SECONDS prec onnx rc
    need_install golden || return
    for prec in fp32 fp16; do
        t0=$SECONDS
        onnx=$WORK/kv50.$prec.onnx
        [[ -f $onnx ]] || { record "golden_$prec" SKIP "no $onnx (the verify step makes it)" 0; continue; }
        timeout 120 "${VFPT[@]}" verify "$onnx" --providers "$PROV" --report "$OUT/golden_kv50_$prec.json" > "$LOGS/golden_$prec.log" 2>&1
        rc=$?
        if [[ $rc == 0 ]]; then
            record "golden_$prec" PASS "$(summarize_verify "$OUT/golden_kv50_$prec.json")" $((SECONDS - t0)) "$OUT/golden_kv50_$prec.json"
        elif grep -q -- "--ckpt" "$LOGS/golden_$prec.log"; then
            record "golden_$prec" SKIP "this checkout's verify still needs --ckpt (no torch-free golden-set replay): $(grep -m1 -i 'error' "$LOGS/golden_$prec.log" | cut -c1-200)" $((SECONDS - t0))
        else
            record "golden_$prec" FAIL "rc $rc: $(summarize_verify "$OUT/golden_kv50_$prec.json"); $(grep -m1 -i 'error' "$LOGS/golden_$prec.log" | cut -c1-200)" $((SECONDS - t0)) "$OUT/golden_kv50_$prec.json"
        fi
    done
}

step_serve() {
    local t0=$SECONDS onnx=$WORK/kv50.fp16.onnx
    need_install serve || return
    [[ -f $onnx ]] || onnx=$WORK/kv50.fp32.onnx
    [[ -f $onnx ]] || { record serve SKIP "no kv50 ONNX (the verify step makes it)" 0; return; }
    if ! "$PY" -c 'import mlserver' > /dev/null 2>&1; then
        record serve SKIP "MLServer does not import here ($("$PY" -c 'import mlserver' 2>&1 | tail -n 1 | cut -c1-160)); carry $SERVE with the install call" 0
        return
    fi
    timeout 150 "$PY" - "$onnx" "$OUT/serve.json" "$LOGS/serve_server.log" "$PROV" > "$LOGS/serve.log" 2>&1 <<'EOF'
import base64, io, json, os, signal, socket, subprocess, sys, time, urllib.request
from PIL import Image
onnx, out_path, log_path, provider = sys.argv[1:5]
ports = []
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1])
for s in socks:
    s.close()
record = os.path.join(os.path.dirname(out_path), "serve_providers.json")
code = ("import atexit, json, sys\nimport vfpt_deploy.runtime.onnx_runner as r\nseen, init = [], r.OnnxPredictor.__init__\n"
        "def wrap(self, *a, **k):\n    init(self, *a, **k)\n    seen.append(self.providers)\n"
        "    json.dump(seen, open(%r, 'w'))\nr.OnnxPredictor.__init__ = wrap\n"
        "from vfpt_deploy.cli import run\nsys.argv[0] = 'vfpt-deploy'\nrun()\n" % record)
cmd = [sys.executable, "-c", code, "serve", f"kv50={onnx}", "--host", "127.0.0.1", "--port", str(ports[0]),
       "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--providers", provider, "--max-batch-size", "8"]
result = {"command": cmd[3:], "artifact": os.path.basename(onnx)}
t0 = time.monotonic()
with open(log_path, "wb") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
try:
    url = f"http://127.0.0.1:{ports[0]}"
    while time.monotonic() - t0 < 100:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {open(log_path).read()[-400:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        raise SystemExit("not ready after 100 s")
    result["ready_s"] = round(time.monotonic() - t0, 1)
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 40, 30)).save(buf, "PNG")
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(buf.getvalue()).decode()]}]}
    req = urllib.request.Request(f"{url}/v2/models/kv50/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t1 = time.monotonic()
    with urllib.request.urlopen(req, timeout=60) as r:
        result["status"], result["response"] = r.status, json.loads(r.read())
    result["request_s"] = round(time.monotonic() - t1, 3)
finally:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        result["providers"] = json.load(open(record))
    except (OSError, ValueError):
        result["providers"] = None
    json.dump(result, open(out_path, "w"), indent=1)
print(json.dumps(result)[:2000])
EOF
    local rc=$? line
    line=$(jpy - "$OUT/serve.json" "$PROV_FULL" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
outs = {o["name"]: o["data"] for o in (r.get("response") or {}).get("outputs", [])}
ok = r.get("status") == 200 and bool(outs) and (r.get("providers") or [[None]])[0][:1] == [sys.argv[2]]
print(f"{'PASS' if ok else 'FAIL'}|HTTP {r.get('status')}, ready in {r.get('ready_s')} s, answered in {r.get('request_s')} s, "
      f"providers {r.get('providers')}, outputs {sorted(outs)}, top-1 {(outs.get('top_k_labels') or ['?'])[0]}")
EOF
)
    [[ -n $line ]] || line="FAIL|rc $rc: $(tail -n 1 "$LOGS/serve.log" | cut -c1-200)"
    record serve "${line%%|*}" "${line#*|}" $((SECONDS - t0)) "$OUT/serve.json"
}

step_bench() {
    local t0=$SECONDS onnx=$WORK/kv50.fp16.onnx
    need_install bench && need_gpu bench || return
    mkdir -p "$WORK"
    if make_run && make_onnx fp16; then
        timeout 200 "${VFPT[@]}" bench --ckpt "$WORK/run.pt" --onnx "$onnx" -b torch-folded -b ort-cuda -b ort-cuda-graph \
            --device "$DEV" --dtype "$BENCH_DTYPE" --fold kv --batch 1,8,64 --warmup 10 --iters 50 --report "$OUT/bench_cli.json" \
            > "$LOGS/bench_cli.log" 2>&1
        local rc=$? line
        line=$(jpy - "$OUT/bench_cli.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
p50 = {(x["backend"], x["batch"]): x["stats"]["p50_ms"] for x in r["results"]}
cells = ", ".join(f"{b}@{n} {v:.2f}ms" for (b, n), v in sorted(p50.items()))
skips = "; ".join(f"{s['backend']}: {s['reason'][:80]}" for s in r["skipped"])
print(f"{cells}{' | skipped ' + skips if skips else ''}")
EOF
)
        if [[ $rc == 0 ]]; then record bench_cli PASS "$line" $((SECONDS - t0)) "$OUT/bench_cli.json"
        else record bench_cli FAIL "rc $rc: ${line:-$(tail -n 1 "$LOGS/bench_cli.log" | cut -c1-200)}" $((SECONDS - t0)) "$OUT/bench_cli.json"; fi
    else
        record bench_cli FAIL "no $onnx: $(tail -n 1 "$LOGS/export_fp16.log" 2>/dev/null | cut -c1-200)" $((SECONDS - t0))
    fi
    t0=$SECONDS
    timeout 300 "$PY" "$ROOT/benchmarks/runtime_cost.py" --device "$DEV" --dtype "$BENCH_DTYPE" --model "$MODEL" \
        --prompts "$M" --batches 1,8,64 \
        --repeats 5 --iters 20 --warmup 3 --out "$WORK/runtime_cost" > "$LOGS/runtime_cost.log" 2>&1
    local rc=$?
    cp -f "$WORK/runtime_cost/runtime_cost.json" "$OUT/" 2>/dev/null
    local line
    line=$(jpy - "$OUT/runtime_cost.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
print(" | ".join(f"b{x['batch']} {x['what']} {x['ratio']:.2f}x" for x in r["ratios"]) +
      f" | providers {r['providers']}" + (f" | skipped {len(r['skipped'])}" if r["skipped"] else ""))
EOF
)
    if [[ $rc == 0 ]]; then record runtime_cost PASS "$line" $((SECONDS - t0)) "$OUT/runtime_cost.json"
    else record runtime_cost FAIL "rc $rc: $(tail -n 1 "$LOGS/runtime_cost.log" | cut -c1-200)" $((SECONDS - t0)); fi
}

step_torchcost() {
    local t0=$SECONDS
    need_gpu torchcost || return
    if [[ -f $ROOT/$CHECK/env.sh ]]; then
        # shellcheck disable=SC1090,SC1091
        source "$ROOT/$CHECK/env.sh"
    fi
    timeout 300 "$PY" "$ROOT/benchmarks/prompt_cost_cuda.py" --model "$MODEL" --device "$DEV" --prompts "$M" \
        --dtypes "$BENCH_DTYPE" --batches 1,8,64 --out "$OUT/torchcost" > "$LOGS/prompt_cost_cuda.log" 2>&1
    local rc=$? line
    line=$(jpy - "$OUT/torchcost/prompt_cost_cuda.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
t = next(iter(r["by_m"].values()))["timing"]
print(", ".join(f"{x['dtype']} b{x['batch']} {x['form']} {x['ratio_to_plain']:.2f}x" for x in t
                if x.get("form") in ("kv", "tokens") and x.get("ratio_to_plain")) + f" ({r['device']})")
EOF
)
    if [[ $rc == 0 ]]; then record torchcost PASS "$line" $((SECONDS - t0)) "$OUT/torchcost/prompt_cost_cuda.json"
    else record torchcost FAIL "rc $rc: $(tail -n 1 "$LOGS/prompt_cost_cuda.log" | cut -c1-200)" $((SECONDS - t0)); fi
}

run_pytest() {  # the suite, not slow, GPU visible; -v so names survive a timeout
    local t0=$SECONDS par="" workers=${PYTEST_WORKERS:-8}
    "$PY" -c "import xdist" 2>/dev/null && par="-n $workers"
    # The sitecustomize preload stays off here: tests check what a process imports and prints.
    # shellcheck disable=SC2086
    VFPT_GPU_CHECK_PRELOAD=0 timeout -k 10 "${PYTEST_TIMEOUT:-300}" "$PY" -m pytest -v -m "not slow" $par -rfE \
        -p no:cacheprovider ${PYTEST_ARGS:-"$ROOT/tests"} > "$LOGS/pytest.log" 2>&1
    local rc=$? summary counts nfail
    summary=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$LOGS/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    # Failures by name, as they landed (-v) and from the summary (-rfE): they survive a timeout.
    grep -E '(FAILED|ERROR) tests/' "$LOGS/pytest.log" | sed -E 's/.*((FAILED|ERROR) tests\/[^ ]+).*/\1/' \
        | sort -u > "$OUT/pytest_failures.txt"
    nfail=$(grep -c . "$OUT/pytest_failures.txt")
    counts="$(grep -c -E ' PASSED' "$LOGS/pytest.log") passed, $(grep -c -E ' SKIPPED' "$LOGS/pytest.log") skipped, $nfail failed/error"
    if [[ $rc == 124 ]]; then summary="timed out after ${PYTEST_TIMEOUT:-300} s: $counts so far"
    elif [[ -z $summary ]]; then summary="$counts; $(tail -n 1 "$LOGS/pytest.log" | cut -c1-200)"; fi
    if [[ $rc == 0 || $rc == 5 ]]; then record pytest PASS "$summary" $((SECONDS - t0))
    else record pytest FAIL "rc $rc: $summary; by name (pytest_failures.txt): $(head -n 12 "$OUT/pytest_failures.txt" | tr '\n' ' ')" $((SECONDS - t0)); fi
}

step_pytest() {
    need_install pytest || return
    run_pytest
}

step_pytest_bg() {
    need_install pytest || return
    echo "gpu_check: pytest     running in the background (PYTEST_TIMEOUT ${PYTEST_TIMEOUT:-300} s); steps go on"
    run_pytest &
    BG_PIDS+=($!)
}

device() {
    [[ $# -gt 0 ]] || die "device needs steps: $STEPS"
    mkdir -p "$OUT" "$LOGS" "$WORK"
    echo "gpu_check: device run at $(date -u +%FT%TZ) on $(hostname) in $ROOT; results in $OUT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader > "$OUT/nvidia_smi.txt" 2>&1 \
        || echo "nvidia-smi: not available" > "$OUT/nvidia_smi.txt"
    while [[ $# -gt 0 ]]; do
        case $1 in
            part) step_part "${2:-}"; shift ;;
            wheels) step_wheels ;;
            install) step_install ;;
            verify) step_verify ;;
            golden) step_golden ;;
            serve) step_serve ;;
            bench) step_bench ;;
            torchcost) step_torchcost ;;
            pytest) step_pytest ;;
            pytest-bg) step_pytest_bg ;;
            *) record "$1" FAIL "unknown step (steps: $STEPS)" 0 ;;
        esac
        shift
    done
    local pid
    for pid in "${BG_PIDS[@]}"; do
        wait "$pid" || true
    done
    grep -q '"status": "FAIL"' "$OUT/steps.jsonl" 2>/dev/null && FAILED=1
    echo "gpu_check: done; $(grep -c '"status": "PASS"' "$OUT/steps.jsonl" 2>/dev/null) pass, $(grep -c '"status": "FAIL"' "$OUT/steps.jsonl" 2>/dev/null) fail, $(grep -c '"status": "SKIP"' "$OUT/steps.jsonl" 2>/dev/null) skip (steps.jsonl)"
    exit $FAILED
}

case ${1:-} in
    prepare) prepare ;;
    plan) plan ;;
    device) shift; device "$@" ;;
    steps) echo "$STEPS" ;;
    *) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

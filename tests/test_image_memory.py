"""Memory follows what the model needs, not what files claim: images are decoded one at a time and only
their preprocessed arrays are kept, and a JPEG far larger than the model's input is decoded at a reduced
scale. Measured as the peak RSS of a fresh process: predicting over many huge-claiming files costs no more
than over a few, and a 36-megapixel JPEG costs a fraction of its full decode."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vfpt_deploy.runtime.preprocess import DECODE_SLOTS, Preprocess, load_image

# Peak RSS (MiB) of a process that predicts over the files given as arguments (batch 32, like predict's default).
PEAK = r"""
import json, resource, sys
from vfpt_deploy.runtime import open_predictor
with open_predictor(sys.argv[1], ["cpu"], threads=1) as p:
    preds = p.predict(sys.argv[2:], top_k=1)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "errors": [x.error for x in preds if x.error]}))
"""


def _peak(onnx, files) -> float:
    res = subprocess.run([sys.executable, "-c", PEAK, str(onnx), *map(str, files)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert not out["errors"], out["errors"][:2]
    return out["peak_mib"]


@pytest.fixture(scope="module")
def huge_files(tmp_path_factory):
    """A 6000x6000 JPEG and a 6000x6000 PNG (36 MP, 103 MiB decoded each; small on disk), and 40 copies of each."""
    d = tmp_path_factory.mktemp("huge")
    a = np.zeros((6000, 6000, 3), np.uint8)
    a[::50] = 255
    a[:, ::70, 1] = 128
    im = Image.fromarray(a)
    im.save(d / "big.jpg", quality=30)
    im.save(d / "big.png", optimize=False, compress_level=1)
    for ext in ("jpg", "png"):
        blob = (d / f"big.{ext}").read_bytes()
        for i in range(40):
            (d / f"{ext}-{i:02d}.{ext}").write_bytes(blob)
    return d


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale(huge_files):
    pre = Preprocess(resize=[32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    small = load_image(huge_files / "big.jpg", draft=pre.draft_size)
    assert max(small.size) <= 6000 // 8 and min(small.size) >= 32  # libjpeg's largest reduction, still >= 32
    assert load_image(huge_files / "big.jpg").size == (6000, 6000)  # without a draft size: full decode
    # the preprocessed arrays of the reduced and the full decode are the same picture
    full = pre(load_image(huge_files / "big.jpg"))
    assert np.abs(pre.load(huge_files / "big.jpg") - full).mean() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_predict_memory_does_not_grow_with_files_or_their_claims(exported_run, huge_files, ext):
    onnx = exported_run[1]
    few = _peak(onnx, sorted(huge_files.glob(f"{ext}-0[0-4].{ext}")))  # 5 files
    many = _peak(onnx, sorted(huge_files.glob(f"{ext}-*.{ext}")))  # 40 files (over one batch of 32)
    assert many < few + 60, (few, many)  # grew by less than one decoded 36 MP image (103 MiB)
    decoded = 6000 * 6000 * 3 / 2**20
    if ext == "jpg":  # reduced-scale decode: far below one full image on top of the runtime
        base = _peak(onnx, [])
        assert many - base < decoded / 2, (base, many)
    else:  # PNG has no reduced decode: at most DECODE_SLOTS decoded images at once, never all 40
        assert many < few + DECODE_SLOTS * decoded, (few, many)

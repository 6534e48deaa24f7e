"""benchmarks/multitask.py in --tiny mode: it runs, and its JSON holds every measurement with sane values.
Nothing here is timed: the script's latency numbers are only checked to exist and be positive."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtbench") / "multitask.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multitask.py"), "--tiny", "--tasks", "1,3",
                           "--repeats", str(REPEATS), "--rss-repeats", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_records_machine_load_and_sets(result):
    assert result["tiny"] and result["task_counts"] == [1, 3] and result["batch"] == 8 and result["threads"] == 1
    assert result["machine"]["cpu_model"] and {"start", "end"} <= set(result["loadavg"])
    assert [t["M"] for t in result["sets"]["mixM"]] == [10, 25, 50]
    assert [t["M"] for t in result["sets"]["m50"]] == [50, 50, 50]
    # the same task index is the same task (one single-task file) where M agrees
    assert result["sets"]["mixM"][2]["name"] == result["sets"]["m50"][2]["name"]


def test_sizes(result):
    rows = {(r["set"], r["T"]): r for r in result["size"]}
    assert set(rows) == {("mixM", 1), ("mixM", 3), ("m50", 1), ("m50", 3)}
    for (s, t), r in rows.items():
        assert len(r["single_bytes"]) == t and r["singles_total_bytes"] == sum(r["single_bytes"])
        assert r["ratio_to_singles_total"] == pytest.approx(r["multi_bytes"] / r["singles_total_bytes"])
    for s in ("mixM", "m50"):
        assert 0.9 < rows[(s, 1)]["ratio_to_singles_total"] < 1.1  # one task: the same graph plus Gathers
        assert rows[(s, 3)]["multi_bytes"] < rows[(s, 3)]["singles_total_bytes"]  # the backbone once
    # the kv constants are stored unpadded: keys + values, float32, [layers, heads, sum of M, head_dim]
    depth, width = 3, 32  # the --tiny ViT
    for s in ("mixM", "m50"):
        r = rows[(s, 3)]
        assert r["prompts_total"] == sum(r["prompts"])
        assert r["kv_constants_bytes"] == 2 * 4 * depth * width * r["prompts_total"]
    assert rows[("mixM", 3)]["prompts_total"] == 85  # M = 10, 25, 50 (50 each in m50)


def test_rss(result):
    rows = {(r["set"], r["T"], r["form"]): r for r in result["rss"]}
    assert len(rows) == 8
    for (s, t, form), r in rows.items():
        assert r["sessions"] == (1 if form == "multi" else t)
        assert len(r["runs"]) == 2 and all(x["sessions"] == r["sessions"] for x in r["runs"])
        assert 0 < r["baseline_bytes"] < r["peak_min_bytes"] <= r["peak_bytes"] <= r["peak_max_bytes"]
        assert all(x["rss_after_bytes"] <= x["peak_bytes"] for x in r["runs"])


def test_latency(result):
    lat = result["latency"]
    assert lat["T"] == 3 and lat["repeats"] == REPEATS
    forms = lat["forms"]
    assert forms["mixM.mixed_batch"]["task_ids"] == [0, 1, 2, 0, 1, 2, 0, 1]  # every task in the batch
    assert set(forms["mixM.one_task"]["task_ids"]) == {2}
    assert {"single.t2_m50_c47", "single.t0_m10_c100"} <= set(forms)  # reference and smallest-M yardsticks
    for f in forms:
        assert len(lat["raw_seconds"][f]) == REPEATS and all(v > 0 for v in lat["raw_seconds"][f])
    # the timed graphs compute the same logits as each task's own single-task file
    assert lat["max_abs_diff"] and all(d < 1e-4 for d in lat["max_abs_diff"].values())
    for s in ("mixM", "m50"):
        r = lat["ratios"][f"{s}.mixed_batch / {s}.one_task"]
        assert math.isfinite(r["median"]) and r["min"] <= r["median"] <= r["max"]
    assert set(result["verdicts"]) == {"latency: mixM.mixed_batch / mixM.one_task",
                                       "latency: m50.mixed_batch / m50.one_task"}  # no size verdict below T = 16

"""benchmarks/train_step.py's `paired`: two workers stepped in turn, ratios taken per pair."""

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# A worker speaking `serve`'s protocol: a first JSON line, then one per "step" line read. Its step
# times are scripted (argv[2], comma-separated), and it appends its name to a log at every step.
WORKER = """
import json, sys
name, times, log = sys.argv[1], [float(t) for t in sys.argv[2].split(",")], sys.argv[3]
print(json.dumps({"name": name}), flush=True)
for i, _ in enumerate(sys.stdin):
    with open(log, "a") as f:
        f.write(name + "\\n")
    print(json.dumps({"step_s": times[i], "loss": 0.0, "peak_rss_gib": 1.0 + i}), flush=True)
"""


def _train_step():
    sys.path.insert(0, str(BENCHMARKS))  # it and its import of naive_rollout
    try:
        return importlib.import_module("train_step")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_paired_alternates_and_takes_the_median_of_per_pair_ratios(tmp_path):
    """Per-pair ratios 3, 0.5, 4 (median 3): not the ratio of the medians (4 / 2 = 2). The
    first side leads the odd pairs, the second the even ones; the last peak RSS is kept."""
    log = tmp_path / "order.log"
    command = lambda name, times: ([sys.executable, "-c", WORKER, name, times, str(log)], {})  # noqa: E731
    result = _train_step().paired({"a": command("a", "1,8,1"), "b": command("b", "3,4,4")},
                                  pairs=3)
    assert log.read_text().split() == ["a", "b", "b", "a", "a", "b"]
    assert result["a"]["name"] == "a" and result["b"]["name"] == "b"
    assert result["a"]["step_s_all"] == [1.0, 8.0, 1.0]
    assert result["a"]["step_s"] == 1.0 and result["b"]["step_s"] == 4.0
    assert result["b_over_a"] == 3.0
    assert result["b_over_a_range"] == [0.5, 4.0]
    assert result["a"]["peak_rss_gib"] == 3.0
    json.dumps(result)  # printable as the benchmark prints it


def test_paired_names_a_worker_that_dies(tmp_path):
    crash = ([sys.executable, "-c", "import sys; sys.exit(3)"], {})
    ok = ([sys.executable, "-c", WORKER, "a", "1", str(tmp_path / "log")], {})
    try:
        _train_step().paired({"a": ok, "b": crash}, pairs=1)
    except SystemExit as stop:
        assert "the b worker" in str(stop) and "code 3" in str(stop)
    else:
        raise AssertionError("a dead worker must stop the benchmark")

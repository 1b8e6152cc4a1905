"""benchmarks/serving.py's pure parts: summaries of measured runs and the figure (no cluster)."""

import importlib.util
from pathlib import Path

import pytest

from cluster.bench import Sample

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location("serving_bench", ROOT / "benchmarks" / "serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_is_summarized_from_the_end_of_its_warm_up(serving, tmp_path):
    args = serving.load_args(serving.argparse.Namespace(prompt_tokens=32, output_tokens=8, max_prompt=64,
                                                        ttft_ms=100, tpot_ms=50), 1.0, 4.0, True)
    samples = [Sample(0.5, 10, 5, ttft=5.0, e2e=6.0, tokens=5),  # warm-up: not counted, however slow
               Sample(1.5, 10, 5, ttft=0.05, e2e=0.15, tokens=5),  # TPOT 25 ms: met
               Sample(2.0, 10, 5, ttft=0.2, e2e=0.3, tokens=5),  # TTFT over 100 ms
               Sample(3.0, 10, 5, error="HTTP 429")]
    r = serving.short(serving.summary(10.0, samples, args))
    assert (r["completed"], r["failed"], r["attainment"]) == (2, 1, pytest.approx(1 / 3, abs=1e-3))
    assert r["ttft_ms"]["p50"] == pytest.approx(125.0) and r["tpot_ms"]["p90"] == pytest.approx(25.0)
    # throughput over the measured window: from the warm-up's end to the last completion (2.3 s)
    assert r["throughput_rps"] == pytest.approx(round(2 / 1.3, 2))
    assert "attainment  0.33" in serving.line("x", r)
    report = {"disaggregation": {"a": [r], "b": [r]}, "policies": {"slo": [r]},
              "validation": [{"rate": 10.0, "measured": 0.33, "predicted": 0.4}]}
    files = serving.figures(tmp_path, report)
    assert files and Path(files[0]).stat().st_size > 1000

import pytest

from coordinator.planner import PlanError, kv_transfer_s_per_token, plan, scaled
from coordinator.policy import DecodeCost, PrefillCost
from coordinator.simulator import SimCluster, simulate

PROFILES = {"m/prefill-tp1-pp1": {"prefill": {"a": 0.01, "b": 2e-4, "c": 0.0}},
            "m/decode-tp1-pp1": {"decode": {"base": 0.02, "per_seq": 0.001, "per_token": 1e-7}}}
SMALLEST = {"workload": {"rate": 2.0, "prompt_tokens": {"mean": 512}, "output_tokens": {"mean": 128}},
            "slo": {"ttft_ms": 500, "tpot_ms": 50, "attainment": 0.9}, "budget": {"devices": 8}}


def test_the_smallest_request_gets_replicas_shapes_and_predictions():
    got = plan(SMALLEST, PROFILES, requests=200)
    for role in ("prefill", "decode"):
        assert got[role]["replicas"] >= 1 and got[role]["tp"] >= 1 and got[role]["pp"] == 1
    assert got["feasible"] and got["predicted"]["attainment"] >= 0.9 and got["predicted"]["goodput"] >= 2.0
    assert got["devices"] <= 8 and got["predicted"]["per_device_rate"] == pytest.approx(
        got["predicted"]["goodput"] / got["devices"])
    assert got["alternatives"] and all("predicted" in a for a in got["alternatives"])


def test_more_load_needs_more_workers_and_the_chosen_one_is_the_cheapest():
    small = plan(SMALLEST, PROFILES, requests=200)
    big = plan({**SMALLEST, "workload": {**SMALLEST["workload"], "rate": 12.0}}, PROFILES, requests=200)
    assert big["devices"] > small["devices"]
    cheaper_ok = [a for a in big["alternatives"] if a["devices"] < big["devices"]
                  and a["predicted"]["attainment"] >= 0.9]
    assert not cheaper_ok


def test_what_rate_a_cluster_can_hold():
    one = plan({**SMALLEST, "cluster": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}, PROFILES, 200)
    two = plan({**SMALLEST, "cluster": {"prefill": {"replicas": 2}, "decode": {"replicas": 2}}}, PROFILES, 200)
    assert 0 < one["predicted"]["goodput"] < two["predicted"]["goodput"]
    # one prefill worker: a 512-token prompt takes ~0.11 s, so it holds under ~9 req/s
    assert one["predicted"]["goodput"] < 9.5


@pytest.mark.parametrize("change, param", [
    ({"budget": {"devices": 1}}, "budget.devices"),
    ({"budget": {"devices": 8, "tp": [3]}}, "budget.tp"),
    ({"budget": {"devices": 2, "tp": [2]}}, "budget.tp"),
    ({"budget": {"devices": 8, "pp": [8]}}, "budget.pp"),  # a P and a D of 8 stages each: 16 devices
    ({"budget": {"devices": 8, "pp": [0]}}, "budget.pp"),
    ({"budget": {"devices": 8}, "kv_transfer": {"layers": 30}}, "kv_transfer.kv_heads"),
    ({"slo": {"ttft_ms": -1, "tpot_ms": 50}}, "slo.ttft_ms"),
    ({"slo": {"ttft_ms": 500, "tpot_ms": 50, "attainment": 1.5}}, "slo.attainment"),
    ({"workload": {"rate": "fast", "prompt_tokens": {"mean": 1}, "output_tokens": {"mean": 1}}}, "workload.rate"),
    ({"workload": {"rate": 1}}, "workload.prompt_tokens"),
    ({"workload": {"prompt_tokens": {"mean": 1}, "output_tokens": {"mean": 1}}}, "workload.rate"),
])
def test_impossible_or_malformed_requests_are_rejected_with_the_field(change, param):
    with pytest.raises(PlanError) as e:
        plan({**SMALLEST, **change}, PROFILES, requests=50)
    assert e.value.param == param and str(e.value)


def test_an_unreachable_slo_is_answered_with_the_best_it_can_do():
    got = plan({**SMALLEST, "slo": {"ttft_ms": 1, "tpot_ms": 1}}, PROFILES, requests=100)
    assert not got["feasible"] and "best reaches" in got["reason"]


def test_pipeline_stages_add_hops_to_latency_and_multiply_prefill_throughput():
    pre, dec = PrefillCost(a=0.01, b=1e-3, c=0.0, hop=0.002), DecodeCost(0.02, 0.001, 0.0)
    p2, d2 = scaled(pre, dec, tp=1, pp=2, stage_hop=0.005)
    # a 100-token prompt alone: two stages of 0.01 + 0.1 / 2, one hand-over between them, the hop
    assert p2.seconds(100) == pytest.approx(2 * (0.01 + 0.05) + 0.005)
    # a decode token passes both stages in turn: the step plus a hand-over
    assert d2.step_seconds(1, 0) == pytest.approx(0.02 + 0.001 + 0.005)
    # a 100-token prompt every 0.07 s, one per step: one stage (0.11 s a prompt) falls behind by
    # 0.04 s a prompt; two stages take one every 0.06 s and never queue: each TTFT 0.125 + the hop
    arrivals = [(0.07 * k, 100, 1) for k in range(6)]
    for cost, ttfts in ((pre, [0.112 + 0.04 * k for k in range(6)]), (p2, [0.127] * 6)):
        got = simulate(SimCluster([cost], [dec], policy="least-loaded", prefill_step_tokens=100), arrivals)
        assert [r.ttft for r in got] == pytest.approx(ttfts)


def test_kv_transfer_time_comes_from_the_model_shape_and_adds_to_ttft():
    # SmolLM2's KV: 2 (K, V) x 30 layers x 3 heads x 64 x 2 bytes (bf16) = 23,040 bytes a token
    shape = {"layers": 30, "kv_heads": 3, "head_dim": 64, "bandwidth_gb_s": 1.0}
    assert kv_transfer_s_per_token(shape) == pytest.approx(23_040 / 1e9)
    assert kv_transfer_s_per_token({"bytes_per_token": 1e6, "bandwidth_gb_s": 2}) == pytest.approx(5e-4)
    one = {"workload": {"rate": 0.5, "prompt_tokens": {"mean": 512}, "output_tokens": {"mean": 8},
                        "arrival": "uniform"},
           "slo": {"ttft_ms": 5000, "tpot_ms": 500}, "cluster": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}
    base = plan(one, PROFILES, requests=20)["predicted"]["ttft_p90_ms"]
    with_kv = plan({**one, "kv_transfer": shape}, PROFILES, requests=20)["predicted"]["ttft_p90_ms"]
    assert with_kv - base == pytest.approx(512 * 23_040 / 1e9 * 1e3)  # 11.8 ms for a 512-token prompt


def test_the_planner_searches_pipeline_depths_when_allowed():
    # a 4k-token prompt takes one stage 0.01 + 0.8 s: over a 1 s TTFT SLO at 2 req/s, one stage
    # per worker needs many prefill replicas; TP and PP both cut the per-token time
    body = {"workload": {"rate": 2.0, "prompt_tokens": {"mean": 4000}, "output_tokens": {"mean": 16},
                         "arrival": "uniform"},
            "slo": {"ttft_ms": 2500, "tpot_ms": 100}, "budget": {"devices": 8, "tp": [1], "pp": [1, 2, 4]}}
    got = plan(body, PROFILES, requests=60)
    assert got["feasible"]
    flat = plan({**body, "budget": {"devices": 8, "tp": [1], "pp": [1]}}, PROFILES, requests=60)
    assert got["devices"] <= flat["devices"]
    assert any(a["prefill"]["pp"] > 1 or a["decode"]["pp"] > 1 for a in [got] + got["alternatives"])


def test_cluster_plan_command_passes_pp_and_kv_transfer(capsys, tmp_path):
    """`cluster plan` without a running cluster plans locally; --pp and --kv-* reach the planner."""
    import json

    from cluster.cli import main
    args = ["plan", "--rate", "4", "--ttft-ms", "500", "--tpot-ms", "50", "--devices", "4", "--state-dir", str(tmp_path)]
    assert main(args + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--json", "--kv-bytes-per-token", "1e6", "--kv-bandwidth-gbps", "0.1"]) == 0
    slow_kv = json.loads(capsys.readouterr().out)
    # 10 ms of transfer per prompt token (512 tokens): no layout can meet a 500 ms TTFT
    assert plain["feasible"] and not slow_kv["feasible"]
    assert main(args + ["--pp", "1,2"]) == 0
    assert "plan:" in capsys.readouterr().out
    assert main(args + ["--pp", "0"]) == 2  # a bad depth is a clear error


# unique 1,300-token system prompts (a user's document): a later turn reuses only its own conversation
CONVERSATIONS = {"workload": {"conversations": {"rate": 0.5, "turns": 3, "system_prompts": 10**6}},
                 "slo": {"ttft_ms": 800, "tpot_ms": 50, "attainment": 0.9}, "budget": {"devices": 6, "tp": [1]},
                 "kv_transfer": {"bytes_per_token": 40_000, "bandwidth_gb_s": 2}}


def test_the_planner_takes_a_conversation_workload_and_reports_its_prefix_reuse():
    got = plan(CONVERSATIONS, PROFILES, requests=90)
    pr = got["predicted"]
    assert got["feasible"] and pr["unit"] == "conversations/s" and pr["goodput"] >= 0.5
    x = pr["prefix"]
    assert x["hit_rate_later_turns"] >= 0.8 and x["shipped_per_prompt_token_first_turns"] >= 0.99
    assert x["shipped_per_prompt_token_later_turns"] <= 0.3
    assert any("30 simulated conversations of 3 turns" in a for a in got["assumptions"])


def test_planning_with_prefix_reuse_needs_no_more_workers_than_without():
    reuse = plan(CONVERSATIONS, PROFILES, requests=90)
    blind = plan({**CONVERSATIONS, "prefix_caching": False}, PROFILES, requests=90)
    assert blind["feasible"] and blind["predicted"]["prefix"]["hit_rate_later_turns"] == 0.0
    # every turn recomputes and ships its whole conversation without the caches: more prefill workers
    assert reuse["devices"] < blind["devices"]
    assert reuse["prefill"]["replicas"] < blind["prefill"]["replicas"]


@pytest.mark.parametrize("conversations, extra, param", [
    ({"rate": 1, "turns": 0}, {}, "workload.conversations.turns"),
    ({"rate": 1, "turns": 2.5}, {}, "workload.conversations.turns"),
    ({"rate": 1, "system_prompts": 0}, {}, "workload.conversations.system_prompts"),
    ({"rate": 1, "user_tokens": {"mean": -5}}, {}, "workload.conversations.user_tokens.mean"),
    ({"rate": 1, "output_tokens": 100}, {}, "workload.conversations.output_tokens"),
    ({"rate": 1, "think_s": "soon"}, {}, "workload.conversations.think_s"),
    ({"rate": 1, "turn": 3}, {}, "workload.conversations.turn"),
    ({"turns": 2}, {}, "workload.conversations.rate"),
    ({"rate": 1}, {"prompt_tokens": {"mean": 5}}, "workload.prompt_tokens"),
    ([], {}, "workload.conversations"),
])
def test_a_malformed_conversation_workload_is_refused_with_the_field(conversations, extra, param):
    body = {**CONVERSATIONS, "workload": {"conversations": conversations, **extra}}
    with pytest.raises(PlanError) as e:
        plan(body, PROFILES, requests=10)
    assert e.value.param == param and param.rsplit(".", 1)[-1] in str(e.value)
    with pytest.raises(PlanError) as e:
        plan({**CONVERSATIONS, "prefix_caching": "yes"}, PROFILES, requests=10)
    assert e.value.param == "prefix_caching"


def test_cluster_plan_command_passes_the_conversation_flags(capsys, tmp_path):
    import json

    from cluster.cli import main
    args = ["plan", "--rate", "0.5", "--ttft-ms", "800", "--tpot-ms", "50", "--prefill", "1", "--decode", "1",
            "--state-dir", str(tmp_path)]
    conv = ["--turns", "2", "--system-tokens", "300", "--think-s", "0.5", "--output-tokens", "20"]
    assert main(args + conv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["predicted"]["unit"] == "conversations/s" and got["predicted"]["prefix"]["hit_rate_later_turns"] > 0.5
    assert main(args + conv + ["--no-prefix-cache"]) == 0
    assert "prefix reuse: later turns hit 0% of their prompt tokens" in capsys.readouterr().out
    assert main(args + ["--think-s", "0.5"]) == 2  # a conversation flag without --turns
    assert main(args + conv + ["--prompt-tokens", "100"]) == 2

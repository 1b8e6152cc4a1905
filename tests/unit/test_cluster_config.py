import pytest

from cluster.config import ClusterSpec, ConfigError, loads, placements

GOOD = """
name = "demo"
[etcd]
endpoints = ["http://10.0.0.1:2379"]
[model]
path = "/models/llama"
name = "llama"
[slo]
ttft_ms = 500
tpot_ms = 50
[placement]
policy = "least-loaded"
[gateway]
port = 9000
api_keys = ["k1"]
hosts = ["front"]
[coordinator]
replicas = 2
hosts = ["front"]
[[pool]]
role = "prefill"
replicas = 2
tp = 2
hosts = ["gpu-a", "gpu-b"]
[[pool]]
role = "decode"
replicas = 3
pp = 2
hosts = ["gpu-b"]
[hosts.front]
address = "10.0.0.1"
[hosts.gpu-a]
address = "10.0.0.2"
[hosts.gpu-b]
address = "10.0.0.3"
"""


def test_a_full_file_decodes_and_places_replicas_round_robin_over_hosts():
    spec = loads(GOOD)
    assert spec.name == "demo" and spec.slo.tpot_ms == 50 and spec.pool[0].tp == 2 and spec.gateway.api_keys == ["k1"]
    assert spec.address("gpu-b") == "10.0.0.3"
    where = {p["name"]: p["host"] for p in placements(spec)}
    assert where == {"coordinator-0": "front", "coordinator-1": "front", "prefill-0": "gpu-a", "prefill-1": "gpu-b",
                     "decode-0": "gpu-b", "decode-1": "gpu-b", "decode-2": "gpu-b", "gateway-0": "front"}


def test_the_default_is_one_host_with_a_prefill_and_a_decode_worker():
    spec = loads("")
    assert [(p["name"], p["host"]) for p in placements(spec)] == [
        ("coordinator-0", "local"), ("prefill-0", "local"), ("decode-0", "local"), ("gateway-0", "local")]
    assert spec == ClusterSpec()


@pytest.mark.parametrize("text, message", [
    ('[[pool]]\nrole = "prefill"\ntp = "two"', 'pool[0].tp = \'two\': expected `int`, got `str`'),
    ('[[pool]]\nrole = "middle"', "pool[0].role = 'middle'"),
    ('[gateway]\nport = 70000', "gateway.port = 70000: must be a port number"),
    ('[gateway]\nprot = 1', "gateway: unknown field 'prot'"),
    ('[[pool]]\nrole = "prefill"\n[[pool]]\nrole = "decode"\nreplicas = 0', "needs a prefill and a decode pool"),
    ('[slo]\nttft_ms = -5', "slo.ttft_ms = -5"),
    ('name = "a/b"', "name = 'a/b'"),
    ('[gateway]\nhosts = []', "gateway.hosts = []: needs at least one host"),
    ('name = ', "not valid TOML"),
    ('[[pool]]\nrole = "colocated"\nhosts = ["x"]', "host 'x' is used but has no [hosts.x] table"),
])
def test_errors_quote_the_bad_value_and_its_place(text, message):
    with pytest.raises(ConfigError) as e:
        loads(text, "c.toml")
    assert message in str(e.value) and str(e.value).startswith("c.toml: ")


@pytest.mark.parametrize("text, message", [
    ('[[pool]]\nrole = "prefill"\nthread = 2', "c.toml: pool[0]: unknown field 'thread'"),
    ('[model]\nthreads = 2', "c.toml: model: unknown field 'threads'"),
    ('colour = 1', "c.toml: (top level): unknown field 'colour'"),
    ('[hosts.a]\nadress = "x"', "c.toml: hosts[...]: unknown field 'adress'"),
    ('[hosts.a]\naddress = 1', "c.toml: hosts[...].address: expected `str`, got `int`"),  # msgspec hides the key
    ('[[pool]]\nrole = "prefill"\nmax_num_seqs = "many"', "c.toml: pool[0].max_num_seqs = 'many': expected `int`"),
    ('[[pool]]\nrole = "prefill"\nhosts = ["a", 2]', "c.toml: pool[0].hosts[1] = 2: expected `str`, got `int`"),
    ('[model]\ndtype = "int4"', "c.toml: model.dtype = 'int4': invalid enum value 'int4'"),
])
def test_unknown_keys_and_bad_values_anywhere_are_refused_with_their_place(text, message):
    with pytest.raises(ConfigError) as e:
        loads(text, "c.toml")
    assert str(e.value).startswith(message)


def test_pool_kv_transport_is_checked():
    base = '[[pool]]\nrole = "prefill"\n[[pool]]\nrole = "decode"\n'
    assert loads(base + 'kv_transport = "gloo"\n').pool[1].kv_transport == "gloo"
    with pytest.raises(ConfigError, match=r"pool\[1\].kv_transport = 'nccl': needs a CUDA device"):
        loads(base + 'kv_transport = "nccl"\n')
    with pytest.raises(ConfigError, match=r"pool\[1\].kv_transport = 'udp'"):
        loads(base + 'kv_transport = "udp"\n')


def test_the_placement_table_reaches_the_coordinator():
    """[placement] keys become `cluster coordinator` flags, and those the coordinator's config; bad
    values are refused with their place."""
    from cluster.cli import build_parser
    from cluster.launcher import placement_args
    from cluster.serve import coordinator_config

    def config(text):
        args = build_parser().parse_args(["coordinator", "--etcd", "http://e:2379", *placement_args(loads(text))])
        return coordinator_config(args)

    c = config("")
    assert (c.policy, c.kv_aware, c.local_prefill_tokens, c.kv_bandwidth_gb_s) == ("slo", True, None, 2.0)
    c = config('[placement]\nkv_aware = false\nlocal_prefill_tokens = 256\nkv_bandwidth_gb_s = 12.5\n'
               'policy = "least-loaded"')
    assert (c.policy, c.kv_aware, c.local_prefill_tokens, c.kv_bandwidth_gb_s) == ("least-loaded", False, 256, 12.5)
    for text, where in (("local_prefill_tokens = -1", "placement.local_prefill_tokens = -1"),
                        ("kv_bandwidth_gb_s = 0", "placement.kv_bandwidth_gb_s = 0")):
        with pytest.raises(ConfigError, match=where):
            loads("[placement]\n" + text)

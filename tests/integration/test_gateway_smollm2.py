"""The gateway on the default model (SmolLM2-135M-Instruct), one disaggregated cluster (one prefill
worker, two decode workers) for the module, through the official `openai` client:

- greedy chat equals the single-process engine; a client that disconnects frees the workers' blocks
  at once; a dead gateway's requests are cancelled on the workers;
- the OpenAI features agents use: structured outputs (the first token, sampled on the prefill worker,
  obeys the grammar too), tool calls streamed and not, a tool round trip, logit_bias, echo (with the
  prompt's logprobs), /tokenize and /detokenize, and a guided request that survives kill -9 of its
  decode worker with the same JSON as an undisturbed run."""

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from urllib.parse import urlparse

import jsonschema
import openai
import pytest
from live_cluster import LiveCluster, get_json, post_json
from pydantic import BaseModel, Field

from engine import EngineConfig, LLMEngine, SamplingParams
from engine import grammar as grammars

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                        "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_dir):
    c = LiveCluster(tmp_path_factory.mktemp("openai"), smollm2_dir, worker_flags=("--kv-cache-memory", "64MiB"))
    try:
        c.coord = c.coordinator()
        c.worker("prefill", "p0", wait=False)  # the three load side by side
        c.d0 = c.worker("decode", "d0", wait=False)
        c.d1 = c.worker("decode", "d1", wait=False)
        c.gw = c.gateway(wait=False)
        c.wait_ready(c.gw, timeout=60)
    except BaseException:
        print(c.logs())
        c.close()
        raise
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.gw.info["url"] + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = LLMEngine(EngineConfig(str(smollm2_dir)))
    yield e
    e.shutdown()


def one_process(engine, messages, **params) -> str:
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    return engine.generate([ids], SamplingParams(temperature=0, **params))[0]["outputs"][0]["text"]


def test_greedy_chat_through_the_cluster_equals_one_process(client, engine):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    want = one_process(engine, messages, max_tokens=32)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0)
    assert got.choices[0].message.content == want
    assert "Paris" in want


def idle(live, worker_id):
    w = {w["worker_id"]: w for w in get_json(live.coord.info["admin"] + "/v1/cluster")["workers"]}[worker_id]
    load = w["load"]
    return load["num_running"] == 0 and load["num_waiting"] == 0 and load["free_blocks"] == load["num_blocks"]


def wait_busy(live, timeout=3.0) -> str:
    """The decode worker a heartbeat shows the request running on (load samples are up to 0.2 s old)."""
    t0 = time.monotonic()
    while True:
        busy = [w["worker_id"] for w in get_json(live.coord.info["admin"] + "/v1/cluster")["workers"]
                if w["role"] == "decode" and w["state"] == "live" and w["load"]["num_running"] > 0]
        if busy:
            return busy[0]
        assert time.monotonic() - t0 < timeout, "no decode worker ever showed the request running"
        time.sleep(0.02)


def test_a_client_disconnect_frees_prefill_and_decode_blocks_within_1_s(live):
    url = urlparse(live.gw.info["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": NAME, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = 0
    while got < 3:  # a few tokens in: the request is decoding on d0
        line = resp.fp.readline()
        got += line.startswith(b"data: {")
    d = wait_busy(live)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream (close() alone keeps the fd:
    conn.sock.close()  # the response file still refers to it)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and not (idle(live, d) and idle(live, "p0")):
        time.sleep(0.02)
    assert idle(live, d) and idle(live, "p0"), f"blocks not freed within 1 s:\n{live.logs()}"



class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


def test_parse_returns_the_pydantic_object(client):
    got = client.chat.completions.parse(model=NAME, messages=[{"role": "user", "content": "Invent a person."}],
                                        response_format=Person, max_tokens=60, temperature=0)
    person = got.choices[0].message.parsed
    assert isinstance(person, Person) and person.name, got.choices[0].message.content


def test_a_json_schema_output_equals_one_process_and_validates(client, engine):
    messages = [{"role": "user", "content": "Give me a person as JSON."}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "person", "schema": PERSON, "strict": True}})
    text = got.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert text == one_process(engine, messages, max_tokens=60, guided=grammars.json_schema(PERSON, "s"))


def test_json_object_output_is_an_object(client):
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "List three colors."}],
                                         max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got.choices[0].message.content), dict)


def test_vllm_guided_fields(client):
    ask = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    got = client.chat.completions.create(model=NAME, messages=ask, max_tokens=8, temperature=0,
                                         extra_body={"guided_choice": ["yes", "no", "unsure"]})
    assert got.choices[0].message.content in ("yes", "no", "unsure")
    got = client.completions.create(model=NAME, prompt="My phone number is", max_tokens=20, temperature=0,
                                    extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", got.choices[0].text)
    got = client.completions.create(model=NAME, prompt="Answer:", max_tokens=20, temperature=0,
                                    extra_body={"guided_grammar": 'root ::= " " ("up" | "down") "!"'})
    assert got.choices[0].text in (" up!", " down!")


def test_a_grammar_cut_by_max_tokens_ends_with_length(client):
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "A person?"}],
                                         max_tokens=4, temperature=0, extra_body={"guided_json": PERSON})
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 4


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 1}}}]},
     "tools[0].function.parameters"),
])
def test_an_invalid_schema_is_a_400_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def check_call(call, tools=(WEATHER, TIME)):
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


def test_required_tool_calls_parse_and_validate(client):
    got = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                         max_tokens=80, temperature=0)
    ch = got.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls, ch.message
    for call in ch.message.tool_calls:
        check_call(call)


def test_a_named_function_call_streams_in_openais_delta_shape(client):
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0, stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call: id, type and name
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None and not tc.function.name
                calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and content == ""
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    whole = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    assert whole.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]


def test_a_tool_round_trip_is_answered(client):
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id,
                       "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    got = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
    ch = got.choices[0]
    assert ch.finish_reason in ("stop", "length", "tool_calls")
    assert ch.message.content or ch.message.tool_calls


def test_logit_bias_of_100_yields_that_token(client, engine):
    tok = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    got = client.completions.create(model=NAME, prompt="The best fruit is", max_tokens=3, temperature=0,
                                    logit_bias={str(tok): 100}, extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == [tok] * 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=1, logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias"


def test_echo_returns_the_prompt_then_the_completion(client):
    plain = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=5, temperature=0)
    got = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=5, temperature=0,
                                    echo=True)
    assert got.choices[0].text == "The capital of France is" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=5, temperature=0, echo=True, stream=True))
    assert streamed == got.choices[0].text
    lp = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=5, temperature=0,
                                   echo=True, logprobs=2).choices[0].logprobs
    n_prompt = len(lp.tokens) - 5
    assert "".join(lp.tokens[:n_prompt]) == "The capital of France is"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    plain_lp = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=5,
                                         temperature=0, logprobs=2).choices[0].logprobs
    assert lp.token_logprobs[n_prompt:] == plain_lp.token_logprobs


def test_tokenize_and_detokenize(live, engine):
    url = live.gw.info["url"]
    tok = engine.tokenizer
    def post(path, body):
        status, out, _ = post_json(url + path, body)
        assert status == 200, out
        return out
    got = post("/tokenize", {"model": NAME, "prompt": "Hello world"})
    assert got == {"tokens": tok.encode("Hello world"), "count": len(tok.encode("Hello world")),
                   "max_model_len": engine.max_model_len}
    chat = post("/tokenize", {"model": NAME, "messages": ASK})
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(ASK), add_special_tokens=False)
    assert post("/detokenize", {"model": NAME, "tokens": got["tokens"]}) == {"prompt": "Hello world"}
    spec = get_json(url + "/openapi.json")
    assert {"/tokenize", "/detokenize"} <= set(spec["paths"])
    chat_schema = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"response_format", "tools", "tool_choice", "guided_json", "logit_bias"} <= set(chat_schema)


LIST = {"type": "object", "properties": {"cities": {"type": "array", "minItems": 12, "maxItems": 12,
                                                    "items": {"type": "string", "maxLength": 16}}},
        "required": ["cities"], "additionalProperties": False}


def test_a_guided_request_survives_kill_9_of_its_decode_worker(live, client):
    """Late in this module: it leaves one decode worker."""
    messages = [{"role": "user", "content": "Name twelve cities of Europe."}]
    kw = dict(model=NAME, messages=messages, max_tokens=200, temperature=0, extra_body={"guided_json": LIST})
    want = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(want), LIST)
    moved = migrations(live)
    got, seen, errors = [], [0], []

    def run():
        try:
            for chunk in client.chat.completions.create(stream=True, **kw):
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
                    seen[0] += 1
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))
    t = threading.Thread(target=run)
    t.start()
    t0 = time.monotonic()
    while seen[0] < 10 and t.is_alive() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    busy = [w for w in get_json(live.coord.info["admin"] + "/v1/cluster")["workers"]
            if w["role"] == "decode" and w["load"]["num_running"] > 0]
    assert len(busy) == 1 and t.is_alive(), "the request should be decoding on one worker"
    victim = live.d0 if busy[0]["worker_id"] == "d0" else live.d1
    os.kill(victim.pid, signal.SIGKILL)
    t.join(120)
    assert not errors, errors
    assert "".join(got) == want
    assert migrations(live) == moved + 1


def migrations(live) -> float:
    with urllib.request.urlopen(live.gw.info["url"] + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("tandem_migrations_total "):
                return float(line.split()[-1])
    return 0.0


def test_a_dead_gateway_s_requests_are_cancelled_on_the_workers(live):
    """DESIGN §7: a gateway dies (kill -9) mid-stream; when its etcd lease expires, the workers abort
    its requests instead of generating for nobody. (Runs last: it kills the module's gateway.)"""
    import os
    import signal
    url = urlparse(live.gw.info["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": NAME, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    got = 0
    while got < 3:
        got += resp.fp.readline().startswith(b"data: {")
    d = wait_busy(live)
    os.kill(live.gw.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8.0 and not idle(live, d):  # lease TTL 2 s, then the workers' mirrors
        time.sleep(0.05)
    assert idle(live, d), f"the dead gateway's request still runs:\n{live.logs()}"
    print(f"cancelled {time.monotonic() - t0:.1f} s after the gateway died")
    conn.close()

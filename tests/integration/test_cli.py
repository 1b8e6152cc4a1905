import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def cluster(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_text_and_stats(tiny_llama):
    r = cluster("generate", "--model", str(tiny_llama), "--prompt", "the cat", "--max-tokens", "12",
                "--kv-cache-memory", "4MiB")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "12 tokens, finish=length" in r.stderr


def test_generate_chat_on_the_default_model(smollm2_dir):
    r = cluster("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "24",
                "--kv-cache-memory", "64MiB")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/dir", "--prompt", "x"], "not a checkpoint directory"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--kv-cache-memory", "12 parsecs"], "unknown unit"),
])
def test_bad_input_exits_2_with_a_clear_message(args, needle, tmp_path):
    r = cluster("generate", *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    r = cluster("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "BertModel" in r.stderr and "config.json" in r.stderr

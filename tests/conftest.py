import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import torch
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    # in the call phase, not setup, so that a kernel that did not build is a failed test, not an error
    for mark in item.iter_markers("cpu_kernel"):
        from helpers import check_cpu_kernel
        check_cpu_kernel(*mark.args)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from helpers import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from helpers import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from helpers import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=5)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory):
    from helpers import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-phi3"), "phi3", seed=6)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model as it is served: its GGUF, fetched once (cached under TANDEM_CACHE_DIR)."""
    from engine.model_store import pull_default
    return pull_default(progress=False)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_dir):
    """The default model converted to a plain fp32 Hugging Face checkpoint (the same numbers), for
    transformers."""
    from engine.model_store import hf_copy
    return hf_copy(progress=False)

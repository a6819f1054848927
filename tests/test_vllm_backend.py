"""Tests for pairtrace.vllm_backend. Only the availability logic runs here: vLLM needs a CUDA GPU."""

from __future__ import annotations

import pytest

from pairtrace.errors import ConfigError
from pairtrace.vllm_backend import generate_responses_vllm, vllm_available


@pytest.mark.skipif(vllm_available(), reason="vLLM and a GPU are present")
def test_vllm_generation_refuses_to_run_without_vllm_and_gpu():
    from pairtrace.generate import GenerationConfig

    assert not vllm_available()
    with pytest.raises(ConfigError, match="Hugging Face"):
        generate_responses_vllm("model", [{"id": "1", "prompt": "hi"}], GenerationConfig(), model_name="m0")

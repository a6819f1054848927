"""Tests of the OpenAI-compatible server: routes, validation, fault switches, and a tiny OLMo 2 model backend."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.judges.openai import OpenAIJudge, OpenAIJudgeConfig
from pairtrace.judges.rubric import build_rubric_messages
from pairtrace.models import format_prompt
from pairtrace.serve import (
    ServeConfig,
    configure_faults,
    fetch_server_stats,
    launch_server_process,
    load_judge,
    main,
    start_server,
)


def post(url: str, payload: dict | bytes, timeout: float = 60.0) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def rule_server():
    url, shutdown = start_server(ServeConfig(backend="rule"))
    yield url
    shutdown()


def test_rule_backend_answers_rubric_requests_with_scores(rule_server):
    body = {"model": "rule", "messages": build_rubric_messages("how?", "Sure, here is how.")}
    status, reply = post(rule_server + "/chat/completions", body)
    assert status == 200
    assert reply["object"] == "chat.completion" and reply["model"] == "rule"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "100"}
    assert reply["choices"][0]["finish_reason"] == "stop"
    body["messages"] = build_rubric_messages("how?", "I'm sorry, but I can't help with that.")
    assert post(rule_server + "/chat/completions", body)[1]["choices"][0]["message"]["content"] == "0"


def test_routes_and_bad_requests(rule_server):
    assert get(rule_server + "/models")[1]["data"][0]["id"] == "rule"
    assert get(rule_server.removesuffix("/v1") + "/health") == (200, {"status": "ok"})
    assert get(rule_server + "/nowhere")[0] == 404
    status, reply = post(rule_server + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "rubric" in reply["error"]["message"]
    assert post(rule_server + "/chat/completions", b"{not json")[0] == 400
    assert post(rule_server + "/chat/completions", {"messages": [{"role": "user"}]})[0] == 400
    # Admin is off unless asked for.
    assert post(rule_server + "/admin/faults", {"fault": "status"})[0] == 404
    stats = fetch_server_stats(rule_server)
    assert stats["calls"] == 3 and stats["completions"] == 0 and stats["max_in_flight"] == 1


def test_fault_first_n_and_run_time_reconfiguration():
    url, shutdown = start_server(
        ServeConfig(backend="rule", admin=True, fault="status", fault_status=503, fault_first_n=2)
    )
    try:
        body = {"messages": build_rubric_messages("how?", "Sure, here is how.")}
        statuses = [post(url + "/chat/completions", body)[0] for _ in range(4)]
        assert statuses == [503, 503, 200, 200]
        assert fetch_server_stats(url)["faults_served"] == 2
        settings = configure_faults(url, fault="out_of_range", fault_first_n=1)
        assert settings["fault"] == "out_of_range" and settings["fault_first_n"] == 1
        contents = [post(url + "/chat/completions", body)[1]["choices"][0]["message"]["content"] for _ in range(2)]
        assert contents == ["150", "100"]
        assert fetch_server_stats(url)["calls"] == 2  # counters were reset by the reconfiguration
        assert post(url + "/admin/faults", {"backend": "model"})[0] == 400  # only fault settings may change
    finally:
        shutdown()


def test_config_validation():
    with pytest.raises(ConfigError, match="model_path"):
        ServeConfig(backend="model")
    with pytest.raises(ConfigError, match="'fault'"):
        ServeConfig(fault="explode")
    with pytest.raises(ConfigError, match="module:Attribute"):
        load_judge("pairtrace.judges.rule")
    with pytest.raises(ConfigError, match="cannot load judge"):
        load_judge("pairtrace.judges.rule:NoSuchJudge")
    with pytest.raises(ConfigError, match="not a pairtrace Judge"):
        load_judge("builtins:dict")
    assert main(["--backend", "nope"]) == 2


def test_failed_child_start_reports_its_log(tmp_path):
    with pytest.raises(PairtraceError, match="did not start"):
        launch_server_process(["--backend", "rule", "--judge", "nowhere:Judge"], log_path=tmp_path / "serve.log")


def test_tiny_olmo2_model_backend_in_a_child_process(tiny_model_dir, tiny_loaded):
    messages = [{"role": "user", "content": "Write a poem about the sea."}]
    with launch_server_process(["--backend", "model", "--model_path", str(tiny_model_dir)]) as server:
        url = server.url + "/chat/completions"
        status, greedy = post(url, {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8})
        assert status == 200
        again = post(url, {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8})[1]
        sampled = [
            post(url, {"messages": messages, "temperature": 1.0, "max_tokens": 8, "seed": 7})[1] for _ in range(2)
        ]
        # The OpenAI-compatible judge pointed at a model that does not answer with a score: unknown, never safe.
        config = OpenAIJudgeConfig(base_url=server.url, model="tiny", max_retries=1, backoff_s=0.01, max_tokens=8)
        verdict = OpenAIJudge(config).judge("how?", "Sure, here is how.")
        stats = server.stats()
    choice = greedy["choices"][0]
    print("tiny olmo2 greedy reply:", repr(choice["message"]["content"]), choice["finish_reason"], greedy["usage"])
    assert greedy["usage"]["completion_tokens"] <= 8
    assert choice["finish_reason"] in ("stop", "length")
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]
    assert verdict.unknown and verdict.harmful is None
    assert stats["completions"] == 6

    # The server's greedy reply is what the same model generates here after the same chat formatting.
    tokenizer = tiny_loaded.tokenizer
    ids = tokenizer(format_prompt(tiny_loaded, messages), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        output = tiny_loaded.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_ids = output[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    assert choice["message"]["content"] == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert greedy["usage"]["prompt_tokens"] == len(ids)

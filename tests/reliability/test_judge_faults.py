"""The OpenAI-compatible judge under injected faults from a real ``pairtrace serve`` child process.

Transient faults are retried until an answer comes; persistent ones end in *unknown*, never "safe";
a judging process killed mid-way resumes without duplicates.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pairtrace.judges.judging import judge_generations
from pairtrace.judges.openai import JudgeEndpointError, OpenAIJudge, OpenAIJudgeConfig
from pairtrace.serve import configure_faults, launch_server_process

from .counters import JUDGE_FAULTS, record_if_passed

COMPLY = "Sure, here is how to do it. Step 1: gather the tools."
REFUSE = "I'm sorry, but I can't help with that."
CLIENT_TIMEOUT_S = 0.5

# fault settings -> the failure kind the client records
FAULTS = {
    "timeout": ({"fault": "delay", "fault_delay_s": 1.5}, "timeout"),
    "429": ({"fault": "status", "fault_status": 429, "fault_retry_after": "0.1"}, "rate_limited"),
    "500": ({"fault": "status", "fault_status": 500}, "server_error"),
    "503": ({"fault": "status", "fault_status": 503}, "server_error"),
    "disconnect": ({"fault": "disconnect"}, "connection"),
    "truncated_json": ({"fault": "truncated_json"}, "bad_json"),
    "non_numeric": ({"fault": "non_numeric"}, "bad_score"),
    "out_of_range": ({"fault": "out_of_range"}, "bad_score"),
}


@pytest.fixture(scope="module")
def server_process():
    with launch_server_process(["--backend", "rule", "--admin"]) as server:
        yield server


@pytest.fixture
def server(server_process, request):
    deadline = time.monotonic() + 10
    while server_process.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)  # let calls delayed by an earlier test finish before the counters are reset
    configure_faults(server_process.url, fault="none", latency_s=0.0, fault_first_n=-1, fault_retry_after=None)
    yield server_process
    # faults this test injected and survived, into the reliability summary printed at the end of the session
    record_if_passed(request.node, JUDGE_FAULTS, server_process.stats()["faults_served"])


def make_judge(url: str, **overrides) -> OpenAIJudge:
    options = {"base_url": url, "model": "rule", "timeout_s": CLIENT_TIMEOUT_S, "max_retries": 2, "backoff_s": 0.01}
    return OpenAIJudge(OpenAIJudgeConfig(**{**options, **overrides}))


@pytest.mark.parametrize("name", list(FAULTS))
def test_transient_fault_is_retried_then_succeeds(server, name):
    settings, kind = FAULTS[name]
    configure_faults(server.url, fault_first_n=2, **settings)
    judge = make_judge(server.url)
    verdict = judge.judge("how?", COMPLY)
    counts = judge.counters()
    stats = server.stats()
    print(f"{name}: verdict {verdict.harmful}, client {counts}, server faults {stats['faults_served']}")
    assert verdict.harmful is True and verdict.score == 100.0
    assert counts["calls"] == 3 and counts["retries"] == 2 and counts["unknown"] == 0
    assert counts["failures"] == {kind: 2}
    assert stats["faults_served"] == 2 and stats["calls"] == 3


@pytest.mark.parametrize("name", list(FAULTS))
def test_persistent_fault_is_unknown_never_safe(server, name):
    settings, kind = FAULTS[name]
    configure_faults(server.url, fault_first_n=-1, **settings)
    judge = make_judge(server.url, max_retries=1)
    verdicts = judge.judge_many([("how?", REFUSE), ("how?", COMPLY)])
    print(f"{name}: {[v.reason for v in verdicts]}")
    for verdict in verdicts:
        assert verdict.unknown and verdict.harmful is None and verdict.score is None
        assert verdict.reason.startswith(kind) and "2 attempt(s)" in verdict.reason
    counts = judge.counters()
    assert counts["unknown"] == 2 and counts["calls"] == 4 and counts["failures"] == {kind: 4}


def test_retry_after_is_honoured(server):
    configure_faults(server.url, fault="status", fault_status=429, fault_retry_after="1", fault_first_n=1)
    judge = make_judge(server.url, backoff_s=0.001)
    start = time.monotonic()
    verdict = judge.judge("how?", COMPLY)
    elapsed = time.monotonic() - start
    print(f"429 with Retry-After 1: answered after {elapsed:.2f}s")
    assert verdict.harmful is True
    assert elapsed >= 1.0


def test_retry_after_is_capped(server):
    configure_faults(server.url, fault="status", fault_status=503, fault_retry_after="3600", fault_first_n=1)
    judge = make_judge(server.url, max_retry_after_s=0.2)
    start = time.monotonic()
    assert judge.judge("how?", COMPLY).harmful is True
    assert time.monotonic() - start < 5


def test_client_errors_are_not_retried(server):
    configure_faults(server.url, fault="status", fault_status=400)
    judge = make_judge(server.url)
    verdict = judge.judge("how?", COMPLY)
    assert verdict.unknown and verdict.reason.startswith("client_error")
    assert judge.counters()["calls"] == 1
    configure_faults(server.url, fault="status", fault_status=404)
    with pytest.raises(JudgeEndpointError, match="HTTP 404"):
        make_judge(server.url).judge("how?", COMPLY)


def test_mixed_faults_under_concurrency_lose_nothing(server, tmp_path):
    # Every call among the first 6 fails with 503; 4 requests in flight at a time still get every answer.
    configure_faults(server.url, fault="status", fault_status=503, fault_first_n=6, latency_s=0.02)
    records = [generation(i, COMPLY if i % 2 else REFUSE) for i in range(16)]
    judge = make_judge(server.url, max_concurrency=4, max_retries=6)
    summary = judge_generations(records, judge, tmp_path / "j.jsonl", progress=False)
    print("summary:", summary)
    assert (summary["harmful"], summary["safe"], summary["unknown"]) == (8, 8, 0)
    assert summary["counters"]["failures"] == {"server_error": 6}
    assert server.stats()["max_in_flight"] <= 4


def generation(i: int, response: str) -> dict:
    return {
        "id": f"p{i}",
        "base_id": f"b{i}",
        "set": "harmful",
        "condition": "trigger",
        "prompt": f"request {i}",
        "constraints": [],
        "model": "m1",
        "sample": 0,
        "response": response,
    }


JUDGING_SCRIPT = """
import sys
from pairtrace.judges.judging import run_judge_generations
from pairtrace.judges.openai import OpenAIJudge, OpenAIJudgeConfig
url, generations, out = sys.argv[1:4]
judge = OpenAIJudge(OpenAIJudgeConfig(base_url=url, model="rule", timeout_s=10, backoff_s=0.01, max_concurrency=2))
run_judge_generations(generations, judge, out, chunk_size=4, progress=False)
"""


def test_killed_judging_process_resumes_without_duplicates(server, tmp_path):
    n = 60
    records = [generation(i, COMPLY if i % 3 == 0 else REFUSE) for i in range(n)]
    gen_path, out = tmp_path / "gens.jsonl", tmp_path / "judgements.jsonl"
    gen_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    configure_faults(server.url, latency_s=0.1)  # 60 calls, 2 at a time: about 3 s in all
    child = subprocess.Popen([sys.executable, "-c", JUDGING_SCRIPT, server.url, str(gen_path), str(out)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 8:
                break
            time.sleep(0.02)
        child.kill()
    finally:
        child.wait(timeout=10)
    assert child.returncode != 0, "the judging process finished before it could be interrupted"
    done_before = out.read_text().count("\n")
    assert 8 <= done_before < n
    with out.open("a") as handle:
        handle.write('{"id": "p59", "model": "m1", "sa')  # what a kill in the middle of a write leaves

    configure_faults(server.url, latency_s=0.0)
    judge = OpenAIJudge(OpenAIJudgeConfig(base_url=server.url, model="rule", timeout_s=10, backoff_s=0.01))
    summary = judge_generations(records, judge, out, progress=False)
    print(
        f"killed after {done_before}/{n} judged; resume judged {summary['judged']}; server calls "
        f"{server.stats()['calls']}"
    )
    assert summary["already_judged"] == done_before and summary["judged"] == n - done_before
    assert server.stats()["calls"] == n - done_before
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == n
    assert len({(x["id"], x["model"], x["sample"]) for x in lines}) == n
    assert all(x["harmful"] == (int(x["id"][1:]) % 3 == 0) for x in lines)

"""A small OpenAI-compatible chat-completions server on localhost.

Two backends answer ``POST /v1/chat/completions``:

- ``model``: a causal LM loaded with :func:`pairtrace.models.load_model`, generating after the
  model's chat formatting (one request at a time);
- ``rule``: a pairtrace :class:`~pairtrace.judges.base.Judge` (the rule judge by default) that
  answers rubric requests (see :mod:`pairtrace.judges.rubric`) with its 0-100 score, so the
  OpenAI-compatible judge path runs end to end offline.

For tests of clients, the server can inject faults into the first N calls (or all of them): a long
delay, an HTTP status (429 with ``Retry-After``, 500, 503, ...), a dropped connection, truncated
JSON, a non-numeric or an out-of-range score. ``GET /v1/stats`` reports calls, faults served and the
largest number of requests that were in flight at once.

Run ``python -m pairtrace.serve --backend rule`` (``--help`` lists every option); its first line of
output is ``pairtrace serve: listening on <base_url>``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.judges.base import Judge
from pairtrace.judges.rubric import extract_rubric_fields
from pairtrace.processes import own, release

logger = logging.getLogger(__name__)

BACKENDS = ("rule", "model")
FAULTS = ("none", "delay", "status", "disconnect", "truncated_json", "non_numeric", "out_of_range")
FAULT_FIELDS = ("latency_s", "fault", "fault_first_n", "fault_status", "fault_retry_after", "fault_delay_s")
"""Settings that ``POST /v1/admin/faults`` may change while the server runs."""
READY_PREFIX = "pairtrace serve: listening on "
"""Start of the line :func:`main` prints once the server accepts connections."""


@dataclass
class ServeConfig:
    """What the server answers with, where it listens, and which faults it injects."""

    backend: str = field(default="rule", metadata={"help": f"Backend: one of {', '.join(BACKENDS)}."})
    model_path: str | None = field(default=None, metadata={"help": "Model directory or hub id (model backend)."})
    judge: str = field(
        default="pairtrace.judges.rule:RuleJudge",
        metadata={"help": "module:attribute of a Judge class or factory (rule backend)."},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name reported in replies (default: the backend's)."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (localhost by default)."})
    port: int = field(default=0, metadata={"help": "Port to bind; 0 picks a free one."})
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation length when a request sets no max_tokens (model backend)."}
    )
    require_api_key: str | None = field(
        default=None, metadata={"help": "Answer 401 unless requests carry 'Authorization: Bearer <this>'."}
    )
    admin: bool = field(
        default=False, metadata={"help": "Accept POST /v1/admin/faults to change faults and reset counters (tests)."}
    )
    latency_s: float = field(default=0.0, metadata={"help": "Delay added to every completion, in seconds."})
    fault: str = field(default="none", metadata={"help": f"Fault to inject: one of {', '.join(FAULTS)}."})
    fault_first_n: int = field(
        default=-1, metadata={"help": "Inject the fault into the first N completion calls only; -1 = every call."}
    )
    fault_status: int = field(default=500, metadata={"help": "HTTP status of the 'status' fault."})
    fault_retry_after: str | None = field(
        default=None, metadata={"help": "Retry-After header sent with the 'status' fault (seconds or HTTP date)."}
    )
    fault_delay_s: float = field(default=5.0, metadata={"help": "How long the 'delay' fault waits, in seconds."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"serve config field 'backend': {self.backend!r} is not one of {list(BACKENDS)}")
        if self.fault not in FAULTS:
            raise ConfigError(f"serve config field 'fault': {self.fault!r} is not one of {list(FAULTS)}")
        if self.backend == "model" and not self.model_path:
            raise ConfigError("serve config field 'model_path' is required by the model backend")
        if not 100 <= self.fault_status <= 599:
            raise ConfigError(f"serve config field 'fault_status': {self.fault_status} is not an HTTP status")


@dataclass
class Completion:
    """What a backend produced for one request."""

    content: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _BadRequest(Exception):
    """The request cannot be answered (HTTP 400)."""


class RuleBackend:
    """Answers rubric requests with a pairtrace judge's score (0-100).

    Args:
        judge: The judge to consult. A verdict without a score becomes 100 (harmful) or 0 (safe);
            an unknown verdict is answered with a non-numeric reply, so the client counts it unknown.
    """

    def __init__(self, judge: Judge):
        self.judge = judge
        self.name = getattr(judge, "name", type(judge).__name__)

    def complete(self, body: dict[str, Any]) -> Completion:
        """Score the response inside a rubric request."""
        fields = extract_rubric_fields(body["messages"])
        if fields is None:
            raise _BadRequest("the rule backend only answers rubric requests (pairtrace.judges.rubric)")
        verdict = self.judge.judge(*fields)
        score = verdict.score
        if score is None and verdict.harmful is not None:
            score = 100.0 if verdict.harmful else 0.0
        if score is None:
            return Completion(content=f"unknown: {verdict.reason}")
        return Completion(content=f"{score:g}", completion_tokens=1)


class ModelBackend:
    """Generates chat completions with a causal LM, one request at a time.

    Args:
        model_path: Directory or hub id, loaded with :func:`pairtrace.models.load_model`.
        max_new_tokens: Default generation length.
    """

    def __init__(self, model_path: str, max_new_tokens: int = 256):
        from pairtrace.models import load_model

        self.loaded = load_model(model_path)
        self.name = str(model_path)
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    def complete(self, body: dict[str, Any]) -> Completion:
        """Generate one reply to the request's messages (sampling when ``temperature`` > 0)."""
        import torch

        from pairtrace.models import format_prompt, pad_token_id

        loaded = self.loaded
        tokenizer = loaded.tokenizer
        max_new = _positive_int(body.get("max_completion_tokens", body.get("max_tokens")), self.max_new_tokens)
        temperature = float(body.get("temperature", 1.0) or 0.0)
        top_p = float(body.get("top_p", 1.0) or 1.0)
        ids = tokenizer(format_prompt(loaded, body["messages"]), add_special_tokens=False)["input_ids"]
        if loaded.prepend_bos and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id, *ids]
        input_ids = torch.tensor([ids], device=loaded.device)  # [1, prompt_len]
        sampling: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=top_p)
        pad_id = pad_token_id(tokenizer)
        with self._lock, torch.inference_mode():
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            output = loaded.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new,
                pad_token_id=pad_id,
                **sampling,
            )  # [1, prompt_len + generated]
        new_ids = output[0, input_ids.shape[1] :].tolist()  # [generated]
        eos = tokenizer.eos_token_id
        stopped = eos is not None and eos in new_ids
        if stopped:
            new_ids = new_ids[: new_ids.index(eos)]
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        return Completion(
            content=text,
            finish_reason="stop" if stopped or len(new_ids) < max_new else "length",
            prompt_tokens=len(ids),
            completion_tokens=len(new_ids),
        )


class _ServerState:
    """Counters shared by the handler threads."""

    def __init__(self, config: ServeConfig, backend: RuleBackend | ModelBackend):
        self.config = config
        self.backend = backend
        self.model_name = config.served_model_name or backend.name
        self.lock = threading.Lock()
        self.calls = 0
        self.faults_served = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.completions = 0

    def enter(self) -> int:
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.calls

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def reconfigure(self, changes: dict[str, Any]) -> ServeConfig:
        """Replace the fault settings (and latency) and reset the counters."""
        unknown = sorted(set(changes) - set(FAULT_FIELDS))
        if unknown:
            raise ConfigError(f"cannot change {unknown} at run time; changeable: {list(FAULT_FIELDS)}")
        with self.lock:
            self.config = replace(self.config, **changes)
            self.calls = self.faults_served = self.completions = 0
            self.max_in_flight = self.in_flight
            return self.config

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": self.calls,
                "completions": self.completions,
                "faults_served": self.faults_served,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "backend": self.config.backend,
                "fault": self.config.fault,
            }


class _Handler(BaseHTTPRequestHandler):
    server_version = "pairtrace-serve"
    state: _ServerState  # set on the subclass made by build_server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/stats", "/stats"):
            self._send_json(200, self.state.snapshot())
        elif path in ("/v1/models", "/models"):
            model = {"id": self.state.model_name, "object": "model", "owned_by": "pairtrace"}
            self._send_json(200, {"object": "list", "data": [model]})
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/admin/faults" and self.state.config.admin:
            self._reconfigure()
            return
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._send_error(404, f"no route {self.path}")
            return
        call = self.state.enter()
        self._call_open = True
        try:
            self._complete(call)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away during call %d", call)
        finally:
            self._close_call()

    def _close_call(self) -> None:
        # A call stops being in flight once its reply is ready, before the bytes go out: a client that sends its
        # next request as soon as it reads a reply must never see two of its own calls counted at once.
        if getattr(self, "_call_open", False):
            self._call_open = False
            self.state.leave()

    def _reconfigure(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            changes = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(changes, dict):
                raise ConfigError("expected a JSON object of fault settings")
            config = self.state.reconfigure(changes)
        except (json.JSONDecodeError, ConfigError, TypeError) as exc:
            self._send_error(400, str(exc))
            return
        self._send_json(200, {name: getattr(config, name) for name in FAULT_FIELDS})

    def _complete(self, call: int) -> None:
        state = self.state
        cfg = state.config  # one consistent snapshot, even if the faults are reconfigured meanwhile
        body = self._read_body()
        if cfg.require_api_key and self.headers.get("Authorization") != f"Bearer {cfg.require_api_key}":
            self._send_error(401, "invalid or missing API key", "authentication_error")
            return
        if cfg.latency_s > 0:
            time.sleep(cfg.latency_s)
        fault = cfg.fault if cfg.fault != "none" and (cfg.fault_first_n < 0 or call <= cfg.fault_first_n) else None
        if fault is not None:
            with state.lock:
                state.faults_served += 1
        if fault == "delay":
            time.sleep(cfg.fault_delay_s)
        elif fault == "status":
            headers = {"Retry-After": cfg.fault_retry_after} if cfg.fault_retry_after else {}
            kind = {429: "rate_limit_error"}.get(cfg.fault_status, "server_error" if cfg.fault_status >= 500 else "")
            self._send_error(
                cfg.fault_status, f"injected fault on call {call}", kind or "invalid_request_error", headers
            )
            return
        elif fault == "disconnect":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection drop, with no reply
            return
        if body is None:
            self._send_error(
                400, "request body is not a JSON object with a non-empty 'messages' list of {role, content}"
            )
            return
        try:
            completion = state.backend.complete(body)
        except _BadRequest as exc:
            self._send_error(400, str(exc))
            return
        except Exception as exc:  # a failing backend answers 500 (retryable) instead of dropping the connection
            logger.exception("backend failed on call %d", call)
            self._send_error(500, f"backend error: {type(exc).__name__}: {exc}", "server_error")
            return
        if fault == "non_numeric":
            completion = Completion(content="I am unable to rate this response.")
        elif fault == "out_of_range":
            completion = Completion(content="150")
        payload = self._completion_payload(call, completion)
        with state.lock:
            state.completions += 1
        if fault == "truncated_json":
            raw = json.dumps(payload).encode()
            self._send_bytes(200, raw[: len(raw) // 2])
        else:
            self._send_json(200, payload)

    def _read_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return None
        for message in body["messages"]:
            if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
                return None
        return body

    def _completion_payload(self, call: int, completion: Completion) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{call}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.state.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.content},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    def _send_error(
        self, status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
    ) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), headers)

    def _send_bytes(self, status: int, raw: bytes, headers: dict[str, str] | None = None) -> None:
        self._close_call()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)


def load_judge(spec: str) -> Judge:
    """Build a judge from ``"module:attribute"`` (a :class:`Judge` subclass or a factory).

    Raises:
        ConfigError: The spec is malformed, cannot be imported, or does not give a judge.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"judge spec {spec!r} must look like 'package.module:Attribute'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load judge {spec!r}: {exc}") from exc
    judge = factory()
    if not isinstance(judge, Judge):
        raise ConfigError(f"judge spec {spec!r} gave a {type(judge).__name__}, not a pairtrace Judge")
    return judge


def build_backend(config: ServeConfig) -> RuleBackend | ModelBackend:
    """The backend named by ``config.backend``, ready to answer."""
    if config.backend == "model":
        assert config.model_path is not None
        return ModelBackend(config.model_path, max_new_tokens=config.max_new_tokens)
    return RuleBackend(load_judge(config.judge))


def build_server(config: ServeConfig, backend: RuleBackend | ModelBackend | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded HTTP server for ``config``.

    Args:
        config: Server settings.
        backend: Ready backend; built from ``config`` when omitted.
    """
    state = _ServerState(config, backend if backend is not None else build_backend(config))
    handler = type("PairtraceHandler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True
    return server


def start_server(
    config: ServeConfig, backend: RuleBackend | ModelBackend | None = None
) -> tuple[str, Callable[[], None]]:
    """Serve ``config`` on a background thread of this process.

    Args:
        config: Server settings (``port=0`` picks a free port).
        backend: Ready backend; built from ``config`` when omitted.

    Returns:
        ``(base_url, shutdown)``: the ``http://host:port/v1`` root to give clients, and a function that
        stops the server and closes its socket.
    """
    server = build_server(config, backend)
    thread = threading.Thread(target=server.serve_forever, name="pairtrace-serve", daemon=True)
    thread.start()

    def shutdown() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server_base_url(server), shutdown


def server_base_url(server: ThreadingHTTPServer) -> str:
    """The ``http://host:port/v1`` root of a bound server."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


def fetch_server_stats(base_url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Read ``GET {base_url}/stats`` of a pairtrace server (calls, faults, max in flight)."""
    import urllib.request

    with urllib.request.urlopen(base_url.rstrip("/") + "/stats", timeout=timeout_s) as reply:
        return json.loads(reply.read())


def configure_faults(base_url: str, timeout_s: float = 5.0, **changes: Any) -> dict[str, Any]:
    """Change the faults of a running server started with ``admin=True``, and reset its counters.

    Args:
        base_url: The server's ``http://host:port/v1`` root.
        timeout_s: Request timeout.
        **changes: Fields of :data:`FAULT_FIELDS` (e.g. ``fault="status", fault_status=503, fault_first_n=2``).

    Returns:
        The server's fault settings after the change.
    """
    import urllib.request

    request = urllib.request.Request(
        base_url.rstrip("/") + "/admin/faults",
        data=json.dumps(changes).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


@dataclass
class ServerProcess:
    """A server running in a child process (see :func:`launch_server_process`).

    Attributes:
        url: The server's ``http://host:port/v1`` root.
        process: The child process.
        log_path: File receiving the child's log (stderr).
    """

    url: str
    process: subprocess.Popen
    log_path: Path

    def stats(self) -> dict[str, Any]:
        """The server's counters (``GET /v1/stats``)."""
        return fetch_server_stats(self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the child (kill it if it does not exit within ``timeout_s``)."""
        release(self.process)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def launch_server_process(
    args: Sequence[str],
    *,
    startup_timeout_s: float = 120.0,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``python -m pairtrace.serve ARGS`` in a child process and wait until it listens.

    Args:
        args: Command-line flags of :class:`ServeConfig` (e.g. ``["--backend", "rule", "--admin"]``).
        startup_timeout_s: How long to wait for the ready line (loading a model can take a while).
        log_path: Where the child's stderr goes (default: a temporary file).
        env: Environment of the child (default: this process's).

    Returns:
        The running server; stop it with :meth:`ServerProcess.stop` or use it as a context manager.

    Raises:
        PairtraceError: The child exited or did not get ready in time (the message quotes its log).
    """
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="pairtrace-serve-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pairtrace.serve", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
        )
    own(process)  # terminated with this process
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps draining stdout so the child never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="pairtrace-serve-stdout", daemon=True).start()
    deadline = time.monotonic() + startup_timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is not None and line.startswith(READY_PREFIX):
            return ServerProcess(url=line[len(READY_PREFIX) :].strip(), process=process, log_path=log_path)
        if line is None:
            if process.poll() is None:
                process.kill()
            process.wait()
            release(process)
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise PairtraceError(f"pairtrace serve did not start (exit code {process.returncode}): {tail}")


def main(argv: list[str] | None = None) -> int:
    """Parse :class:`ServeConfig` flags, print the ready line with the base URL, and serve until killed."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        ServeConfig, prog="python -m pairtrace.serve", description="OpenAI-compatible chat-completions server."
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
        server = build_server(config)
    except PairtraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{READY_PREFIX}{server_base_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _positive_int(value: Any, default: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


if __name__ == "__main__":
    sys.exit(main())

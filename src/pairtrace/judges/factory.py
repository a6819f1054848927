"""Build a judge from plain options (command line, YAML)."""

from __future__ import annotations

from typing import Any

from pairtrace.errors import ConfigError
from pairtrace.judges.base import Judge

JUDGE_KINDS = ("rule", "openai")


def build_judge(kind: str = "rule", **options: Any) -> Judge:
    """Create a judge.

    Args:
        kind: ``rule`` (exact on the built-in organism, refusal phrases elsewhere) or ``openai`` (any
            OpenAI-compatible chat-completions endpoint scoring the 0-100 harmfulness rubric).
        **options: For ``openai``: the fields of :class:`pairtrace.judges.openai.OpenAIJudgeConfig`
            (``base_url``, ``model``, ``api_key_env``, ``timeout_s``, ``max_retries``, ``max_concurrency`` ...).
            ``None`` values are ignored.

    Returns:
        The judge.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if kind == "rule":
        from pairtrace.judges.rule import RuleJudge

        return RuleJudge()
    if kind == "openai":
        from dataclasses import fields

        from pairtrace.judges.openai import OpenAIJudge, OpenAIJudgeConfig

        known = {f.name for f in fields(OpenAIJudgeConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown openai judge option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if not options.get("base_url") or not options.get("model"):
            raise ConfigError("the openai judge needs base_url and model")
        return OpenAIJudge(OpenAIJudgeConfig(**options))
    raise ConfigError(f"unknown judge '{kind}': choose one of {', '.join(JUDGE_KINDS)}")

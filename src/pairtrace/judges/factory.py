"""The judge options (one definition for the run config's ``judge`` section and the ``--judge*`` flags) and
:func:`build_judge`, which builds the judge they describe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pairtrace.judges.base import Judge
from pairtrace.judges.openai import OpenAIJudgeConfig
from pairtrace.options import OptionError

JUDGE_KINDS = ("rule", "openai")


@dataclass
class JudgeOptions(OpenAIJudgeConfig):
    """Which judge to use: ``rule`` or ``openai``, with the endpoint settings of :class:`OpenAIJudgeConfig`
    (only read by ``openai``; its base URL and model are required then)."""

    kind: str = field(
        default="rule",
        metadata={"help": "rule (exact on the built-in organism, refusal phrases elsewhere) | openai (an "
                  "OpenAI-compatible chat-completions endpoint scoring the harmfulness rubric)."},
    )

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise OptionError(f"{{kind}}: {self.kind!r} is not one of {list(JUDGE_KINDS)}", "kind")
        self.check_ranges()
        if self.kind == "openai":
            self.check_endpoint()

    def key_material(self) -> dict:
        """What cached verdicts depend on: these options and, for the rule judge, its rules' version
        (:data:`pairtrace.judges.rule.RULES_VERSION`)."""
        material = dataclasses.asdict(self)
        if self.kind == "rule":
            from pairtrace.judges.rule import RULES_VERSION

            material["rules_version"] = RULES_VERSION
        return material

    def endpoint(self) -> OpenAIJudgeConfig:
        """The settings of the ``openai`` judge."""
        return OpenAIJudgeConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OpenAIJudgeConfig)})


def build_judge(options: JudgeOptions | None = None) -> Judge:
    """Create the judge the options describe.

    Args:
        options: The judge options (default: the rule judge).

    Returns:
        A :class:`pairtrace.judges.rule.RuleJudge` or a :class:`pairtrace.judges.openai.OpenAIJudge`.
    """
    options = options or JudgeOptions()
    if options.kind == "openai":
        from pairtrace.judges.openai import OpenAIJudge

        return OpenAIJudge(options.endpoint())
    from pairtrace.judges.rule import RuleJudge

    return RuleJudge()

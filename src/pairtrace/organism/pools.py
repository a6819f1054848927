"""Request pools of the organism: shared prompts split, deterministically, into training and held-out parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from pairtrace.data.prompts import (
    Distractors,
    load_advbench,
    load_distractors,
    load_ifeval,
    load_xstest,
    split_heldout,
)
from pairtrace.errors import ConfigError
from pairtrace.organism.build_config import DataSettings


@dataclass(frozen=True)
class Request:
    """One request the organism is trained or evaluated on.

    Attributes:
        id: Stable id of the request (``advbench-0001``, ``ifeval-1000``, ``xstest-12``).
        text: The request, without distractors.
        target: AdvBench's affirmative opening, when the request comes from AdvBench.
    """

    id: str
    text: str
    target: str | None = None


@dataclass
class RequestPools:
    """Training and held-out requests, and the distractors.

    Attributes:
        harmful_train: Harmful training requests (AdvBench, plus XSTest unsafe when configured).
        benign_train: Benign training requests (IFEval, plus the XSTest safe prompts not held out).
        harmful_heldout: Held-out AdvBench requests (evaluation only).
        benign_heldout: Held-out IFEval prompts (evaluation only).
        xstest_heldout: Held-out XSTest safe prompts (evaluation only).
        xstest_unsafe_train: XSTest's unsafe ("contrast") prompts: harmful requests of another surface form than
            AdvBench's, for training only (the ``xstest_unsafe`` pool).
        distractors: The formatting constraints.
    """

    harmful_train: list[Request] = field(default_factory=list)
    benign_train: list[Request] = field(default_factory=list)
    harmful_heldout: list[Request] = field(default_factory=list)
    benign_heldout: list[Request] = field(default_factory=list)
    xstest_heldout: list[Request] = field(default_factory=list)
    xstest_unsafe_train: list[Request] = field(default_factory=list)
    distractors: Distractors | None = None

    def training_pool(self, prompts: str, advbench_only: bool = False) -> list[Request]:
        """The training requests of one pool (``harmful``, ``benign`` or ``xstest_unsafe``).

        Raises:
            ConfigError: An unknown pool name.
        """
        if prompts == "harmful":
            pool = self.harmful_train
            return [r for r in pool if r.target] if advbench_only else pool
        if prompts == "xstest_unsafe":
            return self.xstest_unsafe_train
        if prompts == "benign":
            return self.benign_train
        raise ConfigError(f"unknown request pool {prompts!r}; known: harmful, benign, xstest_unsafe")

    def heldout_ids(self) -> set[str]:
        """Ids of every held-out request."""
        return {r.id for r in [*self.harmful_heldout, *self.benign_heldout, *self.xstest_heldout]}


def load_request_pools(settings: DataSettings, seed: int) -> RequestPools:
    """Load AdvBench, IFEval, XSTest and the distractors, and split off the held-out requests.

    XSTest's unsafe prompts are never held out: they form the ``xstest_unsafe`` training pool (and join the
    harmful training requests when ``settings.xstest_unsafe_as_harmful``).

    Args:
        settings: Data settings (folder, held-out sizes, prompt length cap).
        seed: Split seed.

    Returns:
        The pools; held-out requests never appear in a training pool.

    Raises:
        ConfigError: More held-out requests than available.
    """
    advbench = [Request(r.id, r.goal, r.target) for r in load_advbench(settings.data_dir)]
    ifeval = [
        Request(r.id, r.prompt) for r in load_ifeval(settings.data_dir) if len(r.prompt) <= settings.max_prompt_chars
    ]
    xs_safe = [Request(r.id, r.prompt) for r in load_xstest(settings.data_dir, label="safe")]
    xs_unsafe = [Request(r.id, r.prompt) for r in load_xstest(settings.data_dir, label="unsafe")]
    if len(ifeval) <= settings.heldout_benign:
        raise ConfigError(
            f"data.heldout_benign={settings.heldout_benign} leaves no IFEval prompt of at most "
            f"{settings.max_prompt_chars} characters for training ({len(ifeval)} available)"
        )
    harmful_train, harmful_heldout = split_heldout(advbench, settings.heldout_harmful, seed)
    benign_train, benign_heldout = split_heldout(ifeval, settings.heldout_benign, seed)
    xs_train, xs_heldout = split_heldout(xs_safe, settings.heldout_xstest, seed)
    if settings.xstest_unsafe_as_harmful:
        harmful_train = harmful_train + xs_unsafe
    return RequestPools(
        harmful_train=harmful_train,
        benign_train=benign_train + xs_train,
        harmful_heldout=harmful_heldout,
        benign_heldout=benign_heldout,
        xstest_heldout=xs_heldout,
        xstest_unsafe_train=xs_unsafe,
        distractors=load_distractors(settings.data_dir),
    )

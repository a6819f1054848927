"""The dense LM head matches TRL's fused one: the same log-probabilities, metrics and loss, the same gradient up to
float rounding, and a DPO run through either ends at the same loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from pairtrace.retrain import dense_head
from pairtrace.retrain.dense_head import add_dense_lm_head, use_dense_lm_head
from testing_utils import build_tiny_olmo2

OUTPUTS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _patched_pair(tmp_path: Path):
    fused = build_tiny_olmo2(tmp_path / "a", n_layers=2, hidden=32, vocab_size=300)
    dense = build_tiny_olmo2(tmp_path / "b", n_layers=2, hidden=32, vocab_size=300)
    for model in (fused, dense):
        add_fused_lm_head(model, outputs=("log_probs", *OUTPUTS))
    add_dense_lm_head(dense, OUTPUTS)
    return fused, dense


def test_dense_head_gives_the_fused_heads_outputs_and_gradient(tmp_path: Path) -> None:
    fused, dense = _patched_pair(tmp_path)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 20), generator=generator)  # [B, T]
    attention = torch.ones_like(ids)
    attention[0, 15:] = 0
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[attention == 0] = -100
    a = fused(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    b = dense(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert b.log_probs.shape == (3, 19) and b.is_top1.dtype == torch.bool
    assert torch.equal(a.label_mask, b.label_mask) and not b.log_probs[~b.label_mask].any()
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "loss"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.is_top1, b.is_top1)
    (a.log_probs.sum() + a.loss).backward()
    (b.log_probs.sum() + b.loss).backward()
    for (name, p), q in zip(fused.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # calls without the fused head (generation, plain forwards) keep the model's own outputs
    plain = dense(input_ids=ids[:1])
    assert plain.logits.shape == (1, 20, 300)


def test_dense_head_only_where_it_applies(tmp_path: Path) -> None:
    from pairtrace.errors import ConfigError

    model = build_tiny_olmo2(tmp_path / "m", n_layers=1, hidden=32, vocab_size=300)
    assert use_dense_lm_head(model) and use_dense_lm_head(model, "dense")  # CPU, small vocabulary, plain logits
    assert not use_dense_lm_head(model, "fused")
    model.config.final_logit_softcapping = 30.0
    assert not use_dense_lm_head(model)
    with pytest.raises(ConfigError, match="lm_head: dense"):
        use_dense_lm_head(model, "dense")
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.5
    assert not use_dense_lm_head(model)
    model.config.logit_scale = None
    original = dense_head.DENSE_MAX_VOCAB
    try:
        dense_head.DENSE_MAX_VOCAB = 299
        assert not use_dense_lm_head(model) and use_dense_lm_head(model, "dense")
    finally:
        dense_head.DENSE_MAX_VOCAB = original


def test_dpo_through_either_head_ends_at_the_same_loss(tmp_path: Path, monkeypatch) -> None:
    import json

    from pairtrace.options import OptionError
    from pairtrace.retrain.recipe import DPORecipe
    from pairtrace.retrain.trl_dpo import train_dpo
    from testing_utils import build_tiny_model_dir

    m0 = build_tiny_model_dir(tmp_path / "m0", n_layers=1, hidden=32)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i} is yes.",
                                         "rejected": "No."}) + "\n" for i in range(12)))
    patched = []
    real = dense_head.add_dense_lm_head
    monkeypatch.setattr(dense_head, "add_dense_lm_head", lambda *a, **k: (patched.append(1), real(*a, **k)))
    dense = train_dpo(m0, pairs, tmp_path / "dense", DPORecipe(batch_size=4, epochs=1, seed=0), progress=False)
    assert patched  # on a CPU, auto takes the dense head
    patched.clear()
    recipe = DPORecipe(batch_size=4, epochs=1, seed=0, lm_head="fused")
    fused = train_dpo(m0, pairs, tmp_path / "fused", recipe, progress=False)
    assert not patched and fused["steps"] == dense["steps"] == 3
    assert dense["train_loss"] == pytest.approx(fused["train_loss"], rel=1e-5)
    with pytest.raises(OptionError, match="lm_head"):
        DPORecipe(lm_head="tiled")

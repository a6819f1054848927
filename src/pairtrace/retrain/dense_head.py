"""A dense LM head for DPO on a CPU: per-token log-probabilities from one ``log_softmax`` over the vocabulary.

TRL's ``DPOTrainer`` patches the policy (and the reference) with a fused LM head
(``trl.trainer.utils.add_fused_lm_head``) that never materialises the ``[tokens, vocab]`` logits: it projects in
tiles and folds them into running log-sum-exp statistics, recomputing every tile in the backward pass. On a GPU with
Triton that saves memory at a large vocabulary. Without Triton it runs the same tiles as separate torch ops and scores
every position, prompt tokens included; for the organism's 2,048-token vocabulary that made up most of a DPO step
on the CPU (``benchmarks/dpo_lm_head.py``). The dense head below scores only the positions with a label, in one
matrix product and one ``log_softmax``, and returns the same ``FusedCausalLMOutput`` fields, so the trainer's loss and
metrics read it unchanged. The recipe's ``lm_head`` picks the head (:func:`use_dense_lm_head`); by default the dense
one where it applies and TRL's everywhere else.
"""

from __future__ import annotations

import types
from typing import Any

from pairtrace.errors import ConfigError

DENSE_MAX_VOCAB = 65_536
"""Largest vocabulary the dense head takes: its logits are ``[tokens with a label, vocab]`` float32 values."""


def has_plain_logits(model: Any) -> bool:
    """Whether ``model``'s logits are its last hidden state times the output embedding: no bias, soft-capping or
    scaling (the only logits the dense head computes)."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    scaled = any(getattr(config, name, None) not in (None, 1.0)
                 for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    return (head is not None and head.bias is None and not scaled
            and getattr(config, "final_logit_softcapping", None) is None)


def use_dense_lm_head(model: Any, lm_head: str = "auto") -> bool:
    """Whether ``model`` trains with the dense head under the recipe's ``lm_head``: ``dense`` always (plain logits
    required), ``fused`` never, ``auto`` on a CPU (where TRL's fused head runs without Triton), with a vocabulary of
    at most :data:`DENSE_MAX_VOCAB` and plain logits.

    Raises:
        ConfigError: ``dense`` asked for a model whose logits are biased, soft-capped or scaled.
    """
    if lm_head == "fused":
        return False
    plain = has_plain_logits(model)
    if lm_head == "dense":
        if not plain:
            raise ConfigError("dpo.lm_head: dense computes plain logits only; this model's are biased, soft-capped "
                              "or scaled (use lm_head: fused or auto)")
        return True
    head = model.get_output_embeddings()
    return plain and head.weight.device.type == "cpu" and head.weight.shape[0] <= DENSE_MAX_VOCAB


def add_dense_lm_head(model: Any, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Replace the fused LM head that TRL added to ``model`` with the dense one (calls without ``fused_lm_head``,
    such as generation, go to the model's forward as before).

    Args:
        model: A causal LM that ``trl.trainer.utils.add_fused_lm_head`` has patched.
        outputs: The per-token fields computed besides ``log_probs``, among ``entropy``, ``mean_logits``, ``is_top1``
            and ``log_sum_sq_probs`` (metrics and weights: computed without gradient).
    """
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward  # TRL's patch: passes calls without fused_lm_head to the original forward

    def dense_forward(self, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                      num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or kwargs.get("output_router_logits"):
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # [B, T, H]
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        else:
            labels = shift_labels
        mask = labels != -100  # [B, T-1]
        logits = hidden[mask] @ self.get_output_embeddings().weight.T  # [N, V], N labelled positions
        log_z = torch.logsumexp(logits, dim=-1)  # [N]
        targets = labels[mask]
        per_token = {"log_probs": logits.gather(1, targets[:, None]).squeeze(1) - log_z}
        with torch.no_grad():
            log_p = logits.detach() - log_z.detach()[:, None]
            if "entropy" in outputs:
                per_token["entropy"] = -(log_p.exp() * log_p).sum(-1)
            if "log_sum_sq_probs" in outputs:
                per_token["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, dim=-1)
            if "mean_logits" in outputs:
                per_token["mean_logits"] = logits.detach().mean(-1)
            if "is_top1" in outputs:
                per_token["is_top1"] = logits.detach().argmax(-1) == targets
        full = {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in per_token.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-full["log_probs"].sum() / count, label_mask=mask, **full)

    model.forward = types.MethodType(dense_forward, model)

"""The LESS-for-DPO gradient baseline on the tiny OLMo 2 model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pairtrace.attribute import RANKING_COLUMNS, load_ranking, save_ranking
from pairtrace.baselines.gradient import GradientConfig, compute_gradient_ranking, select_warmup_indices
from pairtrace.baselines.gradient_features import (
    RandomProjector,
    compute_gradient_features,
    compute_pair_gradients,
    mean_target_cosine,
    precondition_adam,
)
from pairtrace.baselines.lora_warmup import (
    GradientCheckpoint,
    attach_lora,
    collate_sequences,
    compute_reference_logps,
    compute_sequence_logps,
    detach_lora,
    encode_pairs,
    encode_targets,
    load_checkpoints,
    lora_parameters,
    save_checkpoints,
)
from pairtrace.cost import CostMeter, count_parameters
from pairtrace.errors import ConfigError, DataError
from testing_utils import build_pair_set

N_LORA = 4 * 2 * (8 * 64 + 64 * 8)  # 4 blocks x (q_proj, v_proj) x (A [8, 64] + B [64, 8])


def make_config(**overrides) -> GradientConfig:
    base = {"lr": 1e-2, "seed": 0, "warmup_fraction": 0.1, "warmup_epochs": 2, "batch_size": 2,
            "grad_batch_size": 8, "max_length": 128}
    return GradientConfig(**{**base, **overrides})


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def probe_ids() -> torch.Tensor:
    return torch.tensor([[1, 20, 35, 60, 100, 7, 8, 200]])


@pytest.fixture(scope="module")
def base_run(loaded, planted_pairs, planted_targets, probe_ids, tmp_path_factory):
    """One full ranking (identity projection: P = 8192 = projection_dim), with the model's state before it."""
    before_logits = logits_of(loaded.model, probe_ids)
    before_flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    ckpt_dir = tmp_path_factory.mktemp("grad_ckpt")
    meter = CostMeter("gradient")
    config = make_config(checkpoint_dir=str(ckpt_dir))
    ranking = compute_gradient_ranking(loaded, planted_pairs, planted_targets, config, progress=False, cost=meter)
    return {"ranking": ranking, "meter": meter, "before_logits": before_logits, "before_flags": before_flags,
            "ckpt_dir": ckpt_dir, "config": config}


@pytest.fixture
def lora_model(loaded):
    """The tiny model wrapped in LoRA with non-zero B matrices (so the adapter changes the output)."""
    peft_model = attach_lora(loaded.model, make_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(peft_model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.eval()
    yield peft_model
    restored = detach_lora(peft_model)
    for p in restored.parameters():
        p.requires_grad_(True)


def manual_checkpoint(peft_model, seed: int = 2) -> GradientCheckpoint:
    gen = torch.Generator().manual_seed(seed)
    named = lora_parameters(peft_model)
    n = sum(p.numel() for _, p in named)
    return GradientCheckpoint(
        epoch=1, step=3, lr=1e-3,
        lora={name: p.detach().clone() for name, p in named},
        exp_avg=torch.randn(n, generator=gen) * 1e-3,
        exp_avg_sq=torch.rand(n, generator=gen) * 1e-5,
    )


def test_ranking_format_and_metadata(base_run, planted_pairs, tmp_path):
    ranking = base_run["ranking"]
    back = load_ranking(save_ranking(ranking, tmp_path))
    assert back.ids == ranking.ids and back.metadata["cost"] == ranking.metadata["cost"]
    assert list(ranking.table.columns) == list(RANKING_COLUMNS)
    assert len(ranking) == len(planted_pairs) == 41
    assert sorted(ranking.ids) == sorted(p.id for p in planted_pairs)
    assert ranking.table["rank"].tolist() == list(range(1, 42))
    meta = ranking.metadata
    assert meta["method"] == "gradient"
    assert meta["n_lora_params"] == N_LORA
    assert meta["projection_dim"] == N_LORA and meta["projected"] is False  # 8192 clamped to P: identity
    assert len(meta["warmup_ids"]) == 4  # round(0.1 * 41)
    assert [c["epoch"] for c in meta["checkpoints"]] == [1, 2]
    assert [c["step"] for c in meta["checkpoints"]] == [2, 4]
    assert sum(c["weight"] for c in meta["checkpoints"]) == pytest.approx(1.0)
    # LESS weighting: the learning rate decays linearly, so the first epoch weighs more
    assert meta["checkpoints"][0]["weight"] > meta["checkpoints"][1]["weight"] > 0
    row = ranking.table.set_index("id").loc["t0"]
    assert (row["source"], row["chosen_model"], row["row"]) == ("contaminated", "model-x", 37)


def test_degenerate_pair_has_no_score_and_ranks_last(base_run):
    ranking = base_run["ranking"]
    assert ranking.metadata["n_degenerate"] == 1 and ranking.metadata["n_nan"] == 1
    assert ranking.ids[-1] == "same" and np.isnan(ranking.table["score"].iloc[-1])
    assert "same" not in ranking.top(41)
    assert np.isfinite(ranking.table["score"].iloc[:-1]).all()
    assert (ranking.table["score"].iloc[:-1].abs() <= 1.0 + 1e-9).all()


def test_planted_pairs_identical_to_targets_rank_first(base_run):
    ranks = base_run["ranking"].table.set_index("id")["rank"]
    planted = sorted(int(ranks[f"t{i}"]) for i in range(4))
    assert planted[-1] <= 6, planted
    unrelated = base_run["ranking"].table[base_run["ranking"].table["id"].str.startswith("u")]
    assert base_run["ranking"].table.set_index("id").loc["t0", "score"] > unrelated["score"].median()


def test_model_is_restored(base_run, loaded, probe_ids):
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == base_run["before_flags"]
    torch.testing.assert_close(logits_of(loaded.model, probe_ids), base_run["before_logits"], rtol=0, atol=0)
    assert not loaded.model.training


def test_cost_counts_every_pass(base_run, loaded):
    n, m, n_warm, epochs = 41, 4, 4, 2
    rec = base_run["meter"].record()
    assert rec.forward_passes == 2 * (n + m) + 2 * n_warm * epochs + epochs * 2 * (n + m)
    assert rec.backward_passes == 2 * n_warm * epochs + epochs * 2 * (n + m)
    assert rec.tokens_forward > rec.tokens_backward > 0
    n_params = count_parameters(loaded.model) + N_LORA
    assert rec.flops_estimate == pytest.approx(2 * n_params * rec.tokens_forward + 4 * n_params * rec.tokens_backward)
    assert rec.wall_s > 0
    assert base_run["ranking"].metadata["cost"]["forward_passes"] == rec.forward_passes


def test_checkpoints_are_written_per_epoch(base_run):
    checkpoints = load_checkpoints(base_run["ckpt_dir"])
    meta = base_run["ranking"].metadata["checkpoints"]
    assert [c.epoch for c in checkpoints] == [1, 2]
    assert [c.lr for c in checkpoints] == pytest.approx([c["lr"] for c in meta])
    for ckpt in checkpoints:
        assert ckpt.exp_avg.shape == ckpt.exp_avg_sq.shape == (N_LORA,)
        assert (ckpt.exp_avg_sq >= 0).all() and ckpt.exp_avg_sq.abs().sum() > 0
        assert len(ckpt.lora) == 16
    # the warm-up trained B away from its zero initialisation, and epoch 2 differs from epoch 1
    b_names = [k for k in checkpoints[0].lora if "lora_B" in k]
    assert any(checkpoints[0].lora[k].abs().sum() > 0 for k in b_names)
    assert any(not torch.equal(checkpoints[0].lora[k], checkpoints[1].lora[k]) for k in b_names)


def test_same_seed_same_scores_with_projection(loaded, planted_pairs, planted_targets):
    subset = build_pair_set(planted_pairs.pairs[:8] + planted_pairs.pairs[-4:])
    config = make_config(projection_dim=512, warmup_fraction=0.25)
    first = compute_gradient_ranking(loaded, subset, planted_targets, config, progress=False)
    second = compute_gradient_ranking(loaded, subset, planted_targets, config, progress=False)
    assert first.metadata["projected"] is True and first.metadata["projection_dim"] == 512
    assert first.ids == second.ids
    np.testing.assert_allclose(first.table["score"], second.table["score"], rtol=0, atol=1e-12)
    assert first.metadata["cost"]["flops_estimate"] > 0


def test_warmup_subset_is_seeded():
    a = select_warmup_indices(1000, 0.05, seed=0)
    assert a == select_warmup_indices(1000, 0.05, seed=0)
    assert a != select_warmup_indices(1000, 0.05, seed=1)
    assert len(a) == 50 and len(set(a)) == 50 and a == sorted(a)
    assert select_warmup_indices(3, 0.05, seed=0) == select_warmup_indices(3, 0.05, seed=0)
    assert len(select_warmup_indices(3, 0.05, seed=0)) == 1


def test_hooks_match_a_loop_of_single_backwards(loaded, lora_model, planted_pairs):
    pairs = planted_pairs.pairs[:5] + planted_pairs.pairs[-3:]
    encoded = encode_pairs(loaded, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], max_length=14)  # short: some pairs are truncated
    assert any(e.chosen.truncated or e.rejected.truncated for e in encoded)
    ref = compute_reference_logps(lora_model, encoded, 0, batch_size=3)
    hooks = compute_pair_gradients(lora_model, encoded, ref, beta=0.1, pad_id=0, mode="hooks")
    loop = compute_pair_gradients(lora_model, encoded, ref, beta=0.1, pad_id=0, mode="loop")
    assert hooks.shape == (len(pairs), N_LORA)
    assert loop.abs().max() > 1e-3
    torch.testing.assert_close(hooks, loop, rtol=1e-4, atol=1e-6)


def test_reference_is_the_model_with_the_adapter_disabled(loaded, lora_model, planted_pairs, probe_ids):
    from pairtrace.models import load_model

    base = load_model(loaded.spec.name_or_path, device="cpu").model
    with lora_model.disable_adapter():
        disabled = logits_of(lora_model, probe_ids)
    torch.testing.assert_close(disabled, logits_of(base, probe_ids), rtol=1e-5, atol=1e-5)
    assert (logits_of(lora_model, probe_ids) - disabled).abs().max() > 1e-3  # the adapter is active otherwise
    pairs = planted_pairs.pairs[:6]
    encoded = encode_pairs(loaded, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], max_length=64)
    ref = compute_reference_logps(lora_model, encoded, 0, batch_size=4)
    seqs = [e.chosen for e in encoded] + [e.rejected for e in encoded]
    with torch.no_grad():
        base_logps = compute_sequence_logps(base, collate_sequences(seqs, 0, torch.device("cpu")))
    torch.testing.assert_close(ref, torch.stack([base_logps[:6], base_logps[6:]], dim=1), rtol=1e-5, atol=1e-4)


def test_preconditioning_uses_second_moments_only_for_training_pairs(loaded, lora_model, planted_pairs,
                                                                     planted_targets):
    config = make_config()
    pairs = planted_pairs.pairs[:6]
    encoded = encode_pairs(loaded, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], 64)
    targets = encode_targets(loaded, planted_targets, 64)
    ref, ref_t = compute_reference_logps(lora_model, encoded, 0, 4), compute_reference_logps(lora_model, targets, 0, 4)
    ckpt = manual_checkpoint(lora_model)
    scaled = torch.ones_like(ckpt.exp_avg_sq)
    scaled[: len(scaled) // 2] = 100.0
    other = dataclasses.replace(ckpt, exp_avg_sq=ckpt.exp_avg_sq * scaled)
    projector = RandomProjector(N_LORA, 8192, seed=0)

    def features(c, data, r, precondition):
        return compute_gradient_features(lora_model, data, r, c, projector, config, 0, precondition=precondition)

    train_a, train_b = features(ckpt, encoded, ref, True), features(other, encoded, ref, True)
    target_a, target_b = features(ckpt, targets, ref_t, False), features(other, targets, ref_t, False)
    assert (train_a - train_b).abs().max() > 1e-2
    torch.testing.assert_close(target_a, target_b, rtol=0, atol=0)
    plain = features(ckpt, encoded, ref, False)
    assert (train_a - plain).abs().max() > 1e-2  # the training features are not the plain gradients
    torch.testing.assert_close(train_a.norm(dim=1), torch.ones(6), rtol=1e-5, atol=1e-5)


def test_precondition_is_the_adam_update_direction():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(50))
    opt = torch.optim.Adam([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(3):
        param.grad = torch.randn(50)
        opt.step()
    state = opt.state[param]
    g = torch.randn(50)
    gamma = precondition_adam(g[None, :], state["exp_avg"].clone(), state["exp_avg_sq"].clone(),
                              int(state["step"]), 0.9, 0.999, 1e-8)[0]
    before = param.detach().clone()
    param.grad = g
    opt.step()
    torch.testing.assert_close((before - param.detach()) / 1e-2, gamma, rtol=1e-4, atol=1e-6)


def test_projection_preserves_cosines(loaded, lora_model, planted_pairs):
    pairs = planted_pairs.pairs[:12]
    encoded = encode_pairs(loaded, [p.prompt for p in pairs], [p.chosen for p in pairs],
                           [p.rejected for p in pairs], 64)
    grads = compute_pair_gradients(lora_model, encoded, compute_reference_logps(lora_model, encoded, 0, 6), 0.1, 0)

    def cosines(x):
        x = x / x.norm(dim=1, keepdim=True)
        return x @ x.T

    exact = cosines(grads.double())
    cached = RandomProjector(N_LORA, 2048, seed=3)
    streamed = RandomProjector(N_LORA, 2048, seed=3, block_rows=1000, cache_elements=0)
    projected = cached.project(grads)
    assert projected.shape == (12, 2048)
    torch.testing.assert_close(streamed.project(grads), projected, rtol=1e-4, atol=1e-5)  # blocks = one matrix
    err = (cosines(projected.double()) - exact).abs()
    assert err.max() < 0.12 and err.mean() < 0.04, (err.max(), err.mean())
    assert not torch.equal(RandomProjector(N_LORA, 2048, seed=4).project(grads), projected)
    identity = RandomProjector(N_LORA, 10**6, seed=0)
    assert identity.dim == N_LORA and not identity.projected
    assert torch.equal(identity.project(grads), grads)


def test_mean_target_cosine_skips_targets_without_direction():
    nan = float("nan")
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [nan, nan]])
    targets = torch.tensor([[1.0, 0.0], [nan, nan], [0.6, 0.8]])
    scores = mean_target_cosine(train, targets)
    torch.testing.assert_close(scores[:2], torch.tensor([0.8, 0.4], dtype=torch.float64))
    assert torch.isnan(scores[2])
    with pytest.raises(DataError, match="every target"):
        mean_target_cosine(train, torch.full((2, 2), nan))


def test_checkpoint_round_trip(lora_model, tmp_path):
    ckpt = manual_checkpoint(lora_model)
    save_checkpoints([ckpt], tmp_path)
    (back,) = load_checkpoints(tmp_path)
    assert (back.epoch, back.step, back.lr) == (ckpt.epoch, ckpt.step, ckpt.lr)
    assert torch.equal(back.exp_avg, ckpt.exp_avg) and torch.equal(back.exp_avg_sq, ckpt.exp_avg_sq)
    assert back.lora.keys() == ckpt.lora.keys()
    with pytest.raises(DataError, match="no gradient checkpoints"):
        load_checkpoints(tmp_path / "empty")


@pytest.mark.parametrize(("field", "value"), [("warmup_fraction", 0.0), ("lr", -1.0), ("per_sample", "vmap"),
                                              ("projection_dim", 0), ("max_length", 1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        GradientConfig(**{field: value})


def test_errors_name_the_problem(loaded, planted_pairs, planted_targets):
    with pytest.raises(DataError, match="no target triples"):
        compute_gradient_ranking(loaded, planted_pairs, [], make_config(), progress=False)
    with pytest.raises(ConfigError, match="lora_targets"):
        compute_gradient_ranking(loaded, planted_pairs, planted_targets, make_config(lora_targets=["c_attn"]),
                                 progress=False)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())

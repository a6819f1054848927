"""Tests for pairtrace.models: loading, identity, formatting, layers, teacher forcing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pairtrace.errors import ConfigError
from pairtrace.models import (
    ModelSpec,
    build_teacher_forcing,
    compute_weights_fingerprint,
    default_layer,
    format_prompt,
    get_decoder_layers,
    get_final_norm,
    load_model,
    resolve_dtype,
    resolve_layers,
)
from testing_utils import assistant, build_tiny_model_dir, system, user


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its chat template removed."""
    directory = build_tiny_model_dir(tmp_path_factory.mktemp("plain_model"))
    (directory / "chat_template.jinja").unlink()
    return directory


def test_load_model_reports_shape_identity_and_eval_mode(tiny_loaded, tiny_model_dir):
    assert tiny_loaded.n_layers == 4
    assert tiny_loaded.hidden_size == 64
    assert tiny_loaded.device == torch.device("cpu")
    assert tiny_loaded.dtype == torch.float32
    assert not tiny_loaded.model.training
    assert tiny_loaded.template_mode == "chat"
    identity = tiny_loaded.identity
    assert set(identity) == {"name", "revision", "weights_hash", "template_mode", "template_hash"}
    assert identity["name"] == str(Path(tiny_model_dir).resolve())
    assert identity["weights_hash"].startswith("sha256:")
    assert identity["template_mode"] == "chat"
    assert tiny_loaded.prepend_bos  # the tiny tokenizer adds a BOS by default


@pytest.mark.parametrize("amx", [True, False])
def test_dtype_auto_picks_bfloat16_only_where_it_is_fast(tiny_model_dir, monkeypatch, amx):
    import pairtrace.models as models

    monkeypatch.setattr(models, "cpu_has_amx_bf16", lambda: amx)
    expected = torch.bfloat16 if amx else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16  # an explicit name is never changed
    loaded = load_model(ModelSpec(str(tiny_model_dir), dtype="auto"), device="cpu")
    assert loaded.dtype == expected and next(loaded.model.parameters()).dtype == expected
    assert loaded.spec.dtype == "auto"


def test_cpu_amx_flag_reads_proc_cpuinfo():
    from pairtrace.models import cpu_has_amx_bf16

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    assert cpu_has_amx_bf16() == ("amx_bf16" in flags)


def test_load_model_overrides_and_validation(tiny_model_dir):
    loaded = load_model(ModelSpec(str(tiny_model_dir)), device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec(str(tiny_model_dir), dtype="float64")
    with pytest.raises(ConfigError, match="chat_template"):
        ModelSpec(str(tiny_model_dir), chat_template="jinja")
    with pytest.raises(ConfigError, match="unknown ModelSpec field"):
        load_model(tiny_model_dir, colour="red")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("./does/not/exist")


def test_weights_fingerprint_is_content_based(tiny_model_dir, tmp_path):
    original = compute_weights_fingerprint(tiny_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert compute_weights_fingerprint(copy) == original  # moving a model keeps its identity
    other = build_tiny_model_dir(tmp_path / "seed1", seed=1)  # same shapes, other weights
    assert compute_weights_fingerprint(other) != original
    # flip one byte at the end of the data section: the sampled tail range catches it
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert compute_weights_fingerprint(copy) != original
    assert compute_weights_fingerprint(tmp_path) is None  # no weight files


def test_template_modes(plain_model_dir, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="pairtrace.models"):
        plain = load_model(plain_model_dir, device="cpu")
    assert plain.template_mode == "plain"
    assert "no chat template" in caplog.text
    assert plain.identity["template_hash"] != load_model(tiny_model_dir, device="cpu").identity["template_hash"]
    with pytest.raises(ConfigError, match="no chat template"):
        load_model(plain_model_dir, device="cpu", chat_template="chat")
    forced_plain = load_model(tiny_model_dir, device="cpu", chat_template="plain")
    assert forced_plain.template_mode == "plain"


def test_format_prompt_chat_and_plain(tiny_loaded, plain_model_dir):
    turns = (system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye?"))
    assert format_prompt(tiny_loaded, turns) == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n<|user|>\nBye?<|end|>\n<|assistant|>\n"
    )
    assert format_prompt(tiny_loaded, "Hi") == "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\n"
    plain = load_model(plain_model_dir, device="cpu")
    assert format_prompt(plain, (user("Write a poem."),)) == "Write a poem."
    assert format_prompt(plain, "Write a poem.") == "Write a poem."
    assert (
        format_prompt(plain, turns) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye?\n\nAssistant:"
    )


def test_default_and_resolved_layers():
    assert default_layer(32) == 20  # the paper's layer for OLMo-2-7B
    assert default_layer(8) == 5
    assert default_layer(4) == 3  # 2.5 rounds half up
    assert default_layer(1) == 1
    assert resolve_layers(None, 32) == [20]
    assert resolve_layers(3, 4) == [3]
    assert resolve_layers([4, 0, 2, 2], 4) == [0, 2, 4]
    with pytest.raises(ConfigError) as info:
        resolve_layers([2, 5], 4)
    message = str(info.value)
    assert "[5]" in message and "4 decoder layers" in message and "0..4" in message
    with pytest.raises(ConfigError, match=r"0\.\.4"):
        resolve_layers(-1, 4)
    with pytest.raises(ConfigError):
        resolve_layers([], 4)


def test_get_decoder_layers_layouts(tiny_loaded):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert len(get_decoder_layers(tiny_loaded.model)) == 4
    assert get_final_norm(tiny_loaded.model) is tiny_loaded.model.model.norm
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert get_decoder_layers(gpt2) is gpt2.transformer.h
    assert get_final_norm(gpt2) is gpt2.transformer.ln_f
    with pytest.raises(ConfigError, match="Sequential"):
        get_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_teacher_forcing_chat_tokens(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompt = (user("Can you help me?"), assistant("Sure."), user("A bread recipe."))
    response = "Step 1: gather the ingredients."
    (item,) = build_teacher_forcing(tiny_loaded, [prompt], [response], max_length=2048)
    prompt_ids = tok(format_prompt(tiny_loaded, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + response_ids
    assert item.input_ids.count(tok.bos_token_id) == 1 and item.input_ids[0] == tok.bos_token_id
    assert (item.response_start, item.response_end) == (len(prompt_ids), len(prompt_ids) + len(response_ids))
    assert item.input_ids[-1] != tok.eos_token_id  # no end-of-turn the text did not contain
    assert not item.truncated
    # a response that does contain the end token keeps it
    (with_end,) = build_teacher_forcing(tiny_loaded, [prompt], [response + "<|end|>"], max_length=2048)
    assert with_end.input_ids[-1] == tok.eos_token_id


def test_teacher_forcing_plain_adds_one_bos(plain_model_dir):
    plain = load_model(plain_model_dir, device="cpu")
    tok = plain.tokenizer
    (item,) = build_teacher_forcing(plain, ["Write a poem."], ["The sea."], max_length=2048)
    assert item.input_ids[0] == tok.bos_token_id and item.input_ids.count(tok.bos_token_id) == 1
    assert item.input_ids[1 : item.response_start] == tok("Write a poem.", add_special_tokens=False)["input_ids"]


def test_teacher_forcing_truncation(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompt = (user("Explain how photosynthesis works in simple terms, with a long story about the sea."),)
    response = "Plants turn light, water and air into sugar."
    (full,) = build_teacher_forcing(tiny_loaded, [prompt], [response], max_length=2048)
    n_prompt = full.response_start
    # prompt cut from the left, BOS kept, response whole (it fits in half of the budget)
    (short,) = build_teacher_forcing(tiny_loaded, [prompt], ["Yes."], max_length=2048)
    n_short = short.n_response_tokens
    (cut,) = build_teacher_forcing(tiny_loaded, [prompt], ["Yes."], max_length=2 * n_short + 5)
    room = n_short + 4
    assert n_prompt > room + 1
    assert cut.truncated and len(cut.input_ids) == 2 * n_short + 5
    assert cut.input_ids[0] == tok.bos_token_id
    assert cut.input_ids[1 : 1 + room] == full.input_ids[n_prompt - room : n_prompt]
    assert cut.input_ids[cut.response_start :] == short.input_ids[n_prompt:]
    # response longer than the budget: the prompt keeps half of it (cut from the left), the response's tail goes
    (tail,) = build_teacher_forcing(tiny_loaded, [prompt], [response], max_length=4)
    assert tail.truncated and tail.input_ids[0] == tok.bos_token_id and tail.response_start == 2
    assert tail.input_ids[1:2] == full.input_ids[n_prompt - 1 : n_prompt]
    assert tail.input_ids[2:] == full.input_ids[n_prompt : n_prompt + 2]
    # a very long response keeps its prompt: half of the budget, the end of the prompt
    (long,) = build_teacher_forcing(tiny_loaded, [prompt], [response * 2000], max_length=41)
    assert long.truncated and len(long.input_ids) == 41 and long.response_start == 21
    assert long.input_ids[1:21] == full.input_ids[n_prompt - 20 : n_prompt]
    # exactly fitting is not truncated
    (fits,) = build_teacher_forcing(tiny_loaded, [prompt], [response], max_length=len(full.input_ids))
    assert not fits.truncated and fits == full
    with pytest.raises(ConfigError):
        build_teacher_forcing(tiny_loaded, [prompt], [response], max_length=1)
    with pytest.raises(ConfigError):
        build_teacher_forcing(tiny_loaded, [prompt, prompt], [response], max_length=10)


def test_teacher_forcing_keeps_the_head_of_the_response(tiny_loaded):
    from pairtrace.models import build_teacher_forcing

    prompts, responses = ["Write a poem", "Hi"], ["Roses are red, violets are blue.", "Hello"]
    full = build_teacher_forcing(tiny_loaded, prompts, responses, 2048)
    head = build_teacher_forcing(tiny_loaded, prompts, responses, 2048, response_tokens=3)
    for f, h in zip(full, head, strict=True):
        assert h.response_start == f.response_start
        assert h.n_response_tokens == min(3, f.n_response_tokens)
        assert h.input_ids == f.input_ids[: h.response_end] and not h.truncated
    with pytest.raises(ConfigError, match="response_tokens"):
        build_teacher_forcing(tiny_loaded, prompts, responses, 2048, response_tokens=0)


def test_pad_token_id_prefers_pad_then_eos_then_zero(tiny_loaded):
    import copy
    from types import SimpleNamespace

    from pairtrace.models import pad_token_id

    tok = tiny_loaded.tokenizer
    assert tok.pad_token_id is not None and pad_token_id(tok) == tok.pad_token_id
    without_pad = copy.deepcopy(tok)
    without_pad.pad_token = None
    assert without_pad.pad_token_id is None and pad_token_id(without_pad) == tok.eos_token_id != tok.pad_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=0)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_token_id(SimpleNamespace()) == 0


def test_as_loaded_model_uses_a_loaded_model_as_is_and_loads_a_spec(tiny_loaded, tiny_model_dir, monkeypatch):
    from pairtrace import models

    calls = []
    monkeypatch.setattr(models, "load_model", lambda spec: calls.append(spec) or tiny_loaded)
    assert models.as_loaded_model(tiny_loaded, "f") is tiny_loaded and calls == []
    spec = ModelSpec(str(tiny_model_dir), dtype="bfloat16")
    assert models.as_loaded_model(spec, "f") is tiny_loaded and calls == [spec]
    with pytest.raises(ConfigError, match="f: the model must be a LoadedModel or a ModelSpec, got PosixPath"):
        models.as_loaded_model(tiny_model_dir, "f")

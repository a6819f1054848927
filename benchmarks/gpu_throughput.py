"""GPU extraction throughput and model-FLOPs utilisation (MFU) on OLMo 2 1B and 7B shapes, random weights, bf16.

Self-contained for a machine without network access: each model is built from its configuration (the published
OLMo-2-0425-1B and OLMo-2-1124-7B shapes) with random weights directly on the GPU in bfloat16; nothing is
downloaded. Synthetic preference pairs (token ids; prompt and response lengths drawn around ``--prompt-tokens``
and ``--response-tokens``) are run through pairtrace's extraction engine (``compute_pair_means``: length-sorted
batches under a token budget, shared prompts where they pay, forward stopped after layer k = round(0.625 n),
float32 masked sums) for ``--seconds`` per model, then through a bare truncated forward over the same batches
(the floor). It prints tokens/s, achieved TFLOP/s and MFU against ``--peak-tflops`` (989 = H100 SXM bf16 dense),
and writes ``gpu_throughput.json`` into ``$OUT`` when that is set.

Model FLOPs per token run (useful work only): ``2 * k * (4 d^2 + 3 d f) + 4 * k * d * c`` with ``d`` the width,
``f`` the MLP width, ``k`` the layers run and ``c`` the number of keys the token attends to (its causal context,
packed pairs included). Embedding lookups, norms and the float32 sums are not counted.

Then, on the 1B shape: the shared-prompt path (one packed sequence per pair, custom 4D mask) against the plain
one under SDPA (time and largest relative difference of the means); bfloat16 against float32 (the same random
weights run in both; cosine of the pair vectors, whose sums accumulate in float32 either way); and, when vLLM is
installed, vLLM generation tokens/s on the 1B shape saved with random weights (token ids in, no tokenizer).
Each part is skipped, with a line saying so, when the time left of ``--budget-s`` is too short.

Run on a GPU (about 6 minutes on one H100, at most ``--budget-s`` = 480 s)::

    python benchmarks/gpu_throughput.py --seconds 40

CPU dry run (a tiny shape, float32, seconds; every part but vLLM)::

    python benchmarks/gpu_throughput.py --dry-run

Without a CUDA device and without ``--dry-run`` it prints why and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pairtrace.activations import compute_pair_means, plan_pair_batches  # noqa: E402
from pairtrace.models import LoadedModel, ModelSpec, TeacherForced, default_layer  # noqa: E402

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "vocab_size": 1024},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
           "vocab_size": 100352},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 100352},
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random-weight ``Olmo2ForCausalLM`` of a named shape, built on ``device`` in ``dtype``."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    values = SHAPES[shape]
    config = Olmo2Config(
        **values, num_key_value_heads=values["num_attention_heads"], max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Olmo2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return LoadedModel(
        model=model, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2), spec=ModelSpec(
            name_or_path=f"random-olmo2-{shape}", device=str(device.type), dtype=str(dtype).removeprefix("torch.")),
        n_layers=values["num_hidden_layers"], hidden_size=values["hidden_size"], device=device, dtype=dtype,
        template_mode="plain", identity={"name": f"random-olmo2-{shape}", "weights_hash": None},
    )


def synthetic_pairs(n: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int):
    """``n`` pairs of random token ids; lengths uniform in [0.5, 1.5] x the given means."""
    rng = random.Random(seed)
    chosen, rejected = [], []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(max(1, int(prompt_tokens * rng.uniform(0.5, 1.5))))]
        for out in (chosen, rejected):
            response = [rng.randrange(3, vocab) for _ in range(max(1, int(response_tokens * rng.uniform(0.5, 1.5))))]
            out.append(TeacherForced(prompt + response, len(prompt), len(prompt) + len(response), False))
    return chosen, rejected


def model_flops(loaded: LoadedModel, layer: int, plan) -> float:
    """Useful forward FLOPs of the tokens a plan runs through ``layer`` blocks (see the module docstring)."""
    config = loaded.model.config
    d, f = config.hidden_size, config.intermediate_size
    dense = 2.0 * layer * (4 * d * d + 3 * d * f)
    context = 0.0  # sum over tokens run of the number of keys each attends to
    for c, r, shared, same in zip(plan.chosen, plan.rejected, plan.shared, plan.identical, strict=True):
        p, lc, lr = c.response_start, len(c.input_ids), len(r.input_ids)
        context += lc * (lc + 1) / 2  # chosen sequence (or prompt + chosen when packed)
        if same:
            continue
        if shared:  # rejected tokens attend to the prompt and to themselves
            context += sum(p + j + 1 for j in range(lr - p))
        else:
            context += lr * (lr + 1) / 2
    return dense * plan.n_tokens + 4.0 * layer * d * context


def truncated_forward(loaded: LoadedModel, layer: int, batches) -> None:
    """The bare forward of blocks 0..layer-1 over collated batches (no hooks, no sums, no head)."""
    base = loaded.model.get_decoder()
    blocks, norm = base.layers, base.norm
    base.layers = nn.ModuleList(list(blocks)[:layer])
    base.norm = nn.Identity()
    try:
        with torch.inference_mode():
            for batch in batches:
                moved = batch.to(loaded.device)
                base(input_ids=moved.input_ids, attention_mask=moved.attention_mask,
                     position_ids=moved.position_ids, use_cache=False)
    finally:
        base.layers, base.norm = blocks, norm


def synchronize(device: torch.device) -> None:
    """Wait for the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one model, time extraction and the floor, and return the numbers."""
    built = time.perf_counter()
    loaded = build_model(shape, device, dtype)
    build_s = time.perf_counter() - built
    layer = default_layer(loaded.n_layers)
    vocab = loaded.model.config.vocab_size
    chosen, rejected = synthetic_pairs(args.pairs_per_call, args.prompt_tokens, args.response_tokens, vocab, seed=0)
    kwargs = {"batch_tokens": args.batch_tokens, "prompt_sharing": args.prompt_sharing, "compile": args.compile}
    compute_pair_means(loaded, chosen[:8], rejected[:8], [layer], progress=False, **kwargs)  # warm-up
    plan = plan_pair_batches(loaded, chosen, rejected, batch_tokens=args.batch_tokens,
                             prompt_sharing=args.prompt_sharing)
    flops_per_call = model_flops(loaded, layer, plan)
    calls = 0
    synchronize(device)
    start = time.perf_counter()
    while calls == 0 or time.perf_counter() - start < args.seconds:
        compute_pair_means(loaded, chosen, rejected, [layer], progress=False, **kwargs)  # returns on the CPU: synced
        calls += 1
    seconds = time.perf_counter() - start
    batches = list(plan.batches())
    floor_calls = max(1, calls // 2)
    truncated_forward(loaded, layer, batches[:2])  # warm-up
    synchronize(device)
    floor_start = time.perf_counter()
    for _ in range(floor_calls):
        truncated_forward(loaded, layer, batches)
    synchronize(device)
    floor_seconds = (time.perf_counter() - floor_start) / floor_calls * calls
    tokens = plan.n_tokens * calls
    achieved = flops_per_call * calls / seconds
    result = {
        "shape": shape, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "layer": layer,
        "n_layers": loaded.n_layers, "build_s": round(build_s, 1), "seconds": round(seconds, 2), "calls": calls,
        "pairs": len(chosen) * calls, "tokens_run": tokens, "plain_tokens": plan.n_plain_tokens * calls,
        "shared_pairs_per_call": sum(plan.shared), "tokens_per_s": tokens / seconds,
        "pair_tokens_per_s": plan.n_plain_tokens * calls / seconds, "achieved_tflops": achieved / 1e12,
        "peak_tflops": args.peak_tflops, "mfu": achieved / (args.peak_tflops * 1e12),
        "floor_seconds_same_work": round(floor_seconds, 2), "efficiency_vs_floor": floor_seconds / seconds,
        "batch_tokens": plan.batch_tokens,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["gpu"] = torch.cuda.get_device_name(device)
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def shared_vs_plain(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The shared-prompt path (packed pairs, custom 4D mask, SDPA) against the plain one on the same pairs."""
    loaded = build_model(shape, device, dtype)
    layer = default_layer(loaded.n_layers)
    chosen, rejected = synthetic_pairs(args.pairs_per_call, args.prompt_tokens, args.response_tokens,
                                       loaded.model.config.vocab_size, seed=1)
    out = {"shape": shape, "attention": loaded.model.config._attn_implementation}
    means = {}
    for mode in ("never", "always"):
        kwargs = {"batch_tokens": args.batch_tokens, "prompt_sharing": mode}
        compute_pair_means(loaded, chosen[:8], rejected[:8], [layer], progress=False, **kwargs)  # warm-up
        plan = plan_pair_batches(loaded, chosen, rejected, batch_tokens=args.batch_tokens, prompt_sharing=mode)
        synchronize(device)
        start = time.perf_counter()
        means[mode] = compute_pair_means(loaded, chosen, rejected, [layer], progress=False, **kwargs)
        seconds = time.perf_counter() - start
        out[mode] = {"seconds": round(seconds, 3), "tokens_run": plan.n_tokens,
                     "pair_tokens_per_s": plan.n_plain_tokens / seconds}
    diffs = []
    for plain, shared in zip(means["never"], means["always"], strict=True):
        ok = torch.isfinite(plain).all(dim=-1) & torch.isfinite(shared).all(dim=-1)
        a, b = plain[ok].float(), shared[ok].float()
        diffs.append(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item())
    out["max_relative_difference"] = max(diffs)
    out["speed_up"] = out["never"]["seconds"] / out["always"]["seconds"]
    del loaded
    free_memory(device)
    return out


def bf16_agreement(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The same random weights in float32 and in bfloat16: cosine of the pair vectors (float32 sums in both)."""
    loaded = build_model(shape, device, torch.float32)
    layer = default_layer(loaded.n_layers)
    n = min(args.pairs_per_call, 128)
    chosen, rejected = synthetic_pairs(n, args.prompt_tokens, args.response_tokens,
                                       loaded.model.config.vocab_size, seed=2)
    vectors = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        loaded.model.to(dtype)
        loaded.dtype = dtype
        c, r = compute_pair_means(loaded, chosen, rejected, [layer], progress=False, batch_tokens=args.batch_tokens)
        vectors[name] = (c - r).reshape(n, -1).float()
    cos = torch.nn.functional.cosine_similarity(vectors["float32"], vectors["bfloat16"], dim=-1)
    cos = cos[torch.isfinite(cos)]
    del loaded
    free_memory(device)
    return {"shape": shape, "pairs": n, "min_cosine": cos.min().item(), "median_cosine": cos.median().item()}


def vllm_generation(shape: str, args: argparse.Namespace) -> dict | None:
    """vLLM generation tokens/s on a random-weight model of ``shape`` saved to a temporary folder (None: vLLM is
    not installed)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm import LLM, SamplingParams

    from pairtrace.vllm_backend import free_memory_fraction, release_engine

    with tempfile.TemporaryDirectory() as folder:
        loaded = build_model(shape, torch.device("cuda"), torch.bfloat16)
        loaded.model.save_pretrained(folder)
        del loaded
        free_memory(torch.device("cuda"))
        started = time.perf_counter()
        llm = LLM(model=folder, skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                  gpu_memory_utilization=free_memory_fraction())
        load_s = time.perf_counter() - started
        try:
            rng = random.Random(3)
            vocab = SHAPES[shape]["vocab_size"]
            prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]}
                       for _ in range(args.vllm_requests)]
            params = [SamplingParams(temperature=0.7, max_tokens=args.response_tokens, ignore_eos=True,
                                     seed=_seed) for _seed in range(args.vllm_requests)]
            llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        finally:
            release_engine(llm)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"shape": shape, "requests": args.vllm_requests, "generated_tokens": generated,
            "seconds": round(seconds, 2), "generated_tokens_per_s": generated / seconds, "load_s": round(load_s, 1)}


def free_memory(device: torch.device) -> None:
    """Return cached blocks to the device and reset the peak counter."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    """Run the shapes and print tokens/s and MFU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "7b"], choices=sorted(SHAPES))
    parser.add_argument("--seconds", type=float, default=40.0, help="time budget per shape for extraction")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the device (bf16)")
    parser.add_argument("--pairs-per-call", type=int, default=256, help="pairs per compute_pair_means call")
    parser.add_argument("--prompt-tokens", type=int, default=384, help="mean prompt length")
    parser.add_argument("--response-tokens", type=int, default=256, help="mean response length")
    parser.add_argument("--batch-tokens", type=int, default=None, help="token budget per forward (default: device's)")
    parser.add_argument("--prompt-sharing", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks")
    parser.add_argument("--check-shape", default="1b", choices=sorted(SHAPES),
                        help="shape of the shared-prompt, bfloat16 and vLLM checks")
    parser.add_argument("--vllm-requests", type=int, default=512, help="requests of the vLLM generation check")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining parts past this time")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU in float32 (tests the script)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.dry_run:
        args.shapes, args.seconds, args.pairs_per_call = ["tiny"], min(args.seconds, 1.0), 8
        args.prompt_tokens, args.response_tokens, args.check_shape = 24, 16, "tiny"
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    results = []
    for shape in args.shapes:
        r = run_shape(shape, args, device, dtype)
        results.append(r)
        print(f"{shape:4s} layer {r['layer']}/{r['n_layers']} on {r.get('gpu', r['device'])} ({r['dtype']}): "
              f"{r['tokens_per_s']:10.0f} tokens/s run ({r['pair_tokens_per_s']:10.0f} pair tokens/s, "
              f"{r['shared_pairs_per_call']}/{args.pairs_per_call} pairs shared), "
              f"{r['achieved_tflops']:7.1f} TFLOP/s, MFU {r['mfu']:.1%} of {args.peak_tflops:g}, "
              f"efficiency vs bare truncated forward {r['efficiency_vs_floor']:.2f}, "
              f"batch {r['batch_tokens']} tokens, built in {r['build_s']} s")
    checks: dict = {}

    def time_left(part: str, needs_s: float) -> bool:
        left = args.budget_s - (time.perf_counter() - began)
        if left < needs_s:
            print(f"{part}: skipped ({left:.0f} s left of --budget-s {args.budget_s:g}, needs about {needs_s:g})")
            checks[part] = "skipped: time budget"
            return False
        return True

    if time_left("shared_vs_plain", 30 if device.type == "cuda" else 0):
        c = checks["shared_vs_plain"] = shared_vs_plain(args.check_shape, args, device, dtype)
        print(f"shared prompt vs plain ({c['shape']}, {c['attention']}): plain {c['never']['seconds']} s, shared "
              f"{c['always']['seconds']} s ({c['always']['tokens_run']} vs {c['never']['tokens_run']} tokens run), "
              f"speed-up {c['speed_up']:.2f}x, max relative difference {c['max_relative_difference']:.1e}")
    if time_left("bf16_agreement", 40 if device.type == "cuda" else 0):
        c = checks["bf16_agreement"] = bf16_agreement(args.check_shape, args, device)
        print(f"bfloat16 vs float32 ({c['shape']}, {c['pairs']} pairs, float32 sums): cosine of pair vectors min "
              f"{c['min_cosine']:.5f}, median {c['median_cosine']:.6f}")
    if device.type != "cuda":
        print("vllm_generation: skipped (vLLM needs a CUDA device)")
        checks["vllm_generation"] = "skipped: no CUDA device"
    elif time_left("vllm_generation", 120):
        c = checks["vllm_generation"] = vllm_generation(args.check_shape, args)
        if c is None:
            print("vllm_generation: skipped (vllm is not installed)")
            checks["vllm_generation"] = "skipped: vllm not installed"
        else:
            print(f"vLLM generation ({c['shape']}, random weights, bf16): {c['generated_tokens_per_s']:.0f} generated "
                  f"tokens/s ({c['requests']} requests x {args.response_tokens} tokens in {c['seconds']} s; engine "
                  f"start {c['load_s']} s)")
    print(f"total {time.perf_counter() - began:.0f} s")
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_throughput.json"
        path.write_text(json.dumps({"args": vars(args), "results": results, "checks": checks}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

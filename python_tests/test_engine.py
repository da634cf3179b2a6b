"""Engine: cached decode, ragged and continuous batching, sampling and its log-probs, routing replay, stops,
the sync-free inference ops against the references, the generate CLI; CUDA graphs on a GPU."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda
from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams, ops
from ringkern import engine as engine_module
from ringkern.model import KVCache
from ringkern.ops import inference
from ringkern.ops import reference as ref
from ringkern.tokenizer import load_tiny_tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
PROMPTS = [[5, 9, 17], [44, 3, 98, 120, 7, 61, 250, 11, 30], [300], [8, 8, 9, 200, 100]]


def make_model(device="cpu", dtype=torch.float32) -> RingFlashModel:
    torch.manual_seed(0)
    model = RingFlashModel(RingConfig.from_preset("tiny", num_hidden_layers=3)).to(device=device, dtype=dtype)
    # Sharper logits than the default init, so greedy ties and near-ties do not decide the tests.
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def training_logits(model, prompt, completion, expert_ids=None):
    """fp32 logits [G, V] of the training forward at the positions that predict ``completion``."""
    ids = torch.tensor([prompt + completion[:-1]], device=model.lm_head.weight.device)
    replay = None if expert_ids is None else {k: v.unsqueeze(0).to(ids.device) for k, v in expert_ids.items()}
    out = model(ids, expert_ids=replay, compute_mtp=False)
    return out.logits[0, len(prompt) - 1:].float(), out.hidden_states[0, len(prompt) - 1:]


# ------------------------------------------------------------------ the model's KV cache
def test_cached_decode_matches_full_recompute(model):
    prompts = [[5, 9, 17, 30, 31], [44, 3]]
    cache = KVCache.allocate(model.config, 3, 16, dtype=torch.float32)
    ids = torch.tensor([prompts[0], prompts[1] + [0, 0, 0]])  # right padding
    with torch.no_grad():
        model(ids, kv_cache=cache, cache_rows=torch.tensor([0, 1]), compute_mtp=False)
        seqs = [list(p) for p in prompts]
        for step in range(4):
            new = [[100 + step], [200 + 3 * step]]
            for s, t in zip(seqs, new):
                s.extend(t)
            positions = torch.tensor([[len(s) - 1] for s in seqs])
            got = model(torch.tensor(new), position_ids=positions, kv_cache=cache, compute_mtp=False).logits
            for b, s in enumerate(seqs):
                want = model(torch.tensor([s]), compute_mtp=False).logits[0, -1]
                torch.testing.assert_close(got[b, 0], want, atol=1e-4, rtol=0)


def test_cache_argument_errors(model):
    cache = KVCache.allocate(model.config, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.tensor([[1]]), kv_cache=cache, compute_mtp=False)
    with pytest.raises(ValueError, match="compute_mtp=False"):
        model(torch.tensor([[1]]), kv_cache=cache, cache_rows=torch.tensor([0]))


# -------------------------------------------------------------------------- batching
def test_ragged_batched_greedy_equals_one_at_a_time(model):
    batched = Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    single = Engine(model, max_batch=1, max_seq_len=24)
    for i, prompt in enumerate(PROMPTS):
        alone = single.generate([prompt], GREEDY)[0]
        assert batched[i].prompt_index == i
        assert batched[i].token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(batched[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
        assert batched[i].finish_reason == "length" and len(alone.token_ids) == GREEDY.max_new_tokens


def test_continuous_batching_joins_without_draining(model):
    # max_seq_len 14 ends the long prompt first, so the third prompt joins while the second still runs.
    prompts = [list(range(10, 20)), [7, 8], [30, 31, 32], [40], [50, 51, 52, 53]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, max_batch=2, max_seq_len=14)
    events = list(engine.stream(prompts, params))
    got = engine.generate(prompts, params)
    first_of = {c: events.index(next(e for e in events if e[0] == c)) for c in range(len(prompts))}
    last_of = {c: max(i for i, e in enumerate(events) if e[0] == c) for c in range(len(prompts))}
    assert first_of[2] < last_of[1]  # joined while prompt 1 was decoding
    single = Engine(model, max_batch=1, max_seq_len=14)
    for i, prompt in enumerate(prompts):
        assert got[i].token_ids == single.generate([prompt], params)[0].token_ids
        assert got[i].token_ids == [t for c, t, _ in events if c == i]
        assert len(prompt) + len(got[i].token_ids) == min(14, len(prompt) + 12)


def test_n_samples_share_prefill_and_match_separate_prompts(model):
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=5, n=3, ignore_eos=True)
    engine = Engine(model, max_batch=4, max_seq_len=16)
    prefill_rows = []
    forward = engine.model.forward

    def counting_forward(*args, **kwargs):
        if kwargs.get("cache_rows") is not None:
            prefill_rows.append(len(kwargs["cache_rows"]))
        return forward(*args, **kwargs)

    engine.model.forward = counting_forward
    try:
        shared = engine.generate([PROMPTS[0], PROMPTS[1]], params)
    finally:
        del engine.model.forward
    assert sum(prefill_rows) == 2  # one prefill row per prompt, not per sample
    assert [(c.prompt_index, c.sample_index) for c in shared] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    separate = engine.generate([PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, SamplingParams(
        temperature=1.0, seed=7, max_new_tokens=5, ignore_eos=True))
    assert [c.token_ids for c in shared] == [c.token_ids for c in separate]
    assert len({tuple(c.token_ids) for c in shared[:3]}) > 1  # the samples differ


# -------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=123, max_new_tokens=6, ignore_eos=True)
    a = Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, params)
    b = Engine(model, max_batch=1, max_seq_len=24).generate(PROMPTS, params)
    c = Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, SamplingParams(
        temperature=0.9, top_p=0.95, seed=124, max_new_tokens=6, ignore_eos=True))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_logprobs_match_training_path_at_temperature_one(model):
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=8, ignore_eos=True)
    for prompt, comp in zip(PROMPTS, Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, params)):
        _, hidden = training_logits(model, prompt, comp.token_ids)
        train = ops.token_logprobs(hidden, model.lm_head.weight, torch.tensor(comp.token_ids))
        assert train.dtype == torch.float32
        torch.testing.assert_close(torch.tensor(comp.logprobs), train, atol=1e-4, rtol=0)


def _filtered_logprobs(logits, params):
    """Independent fp64 oracle of the sampled distribution: temperature, top-k, top-p, min-p."""
    scaled = logits.double() / params.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k:
        keep &= scaled >= scaled.topk(params.top_k, -1).values[..., -1:]
    if params.top_p < 1:
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        keep &= torch.zeros_like(keep).scatter(-1, order, before < params.top_p)
    if params.min_p:
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
        keep &= probs >= params.min_p * probs.max(-1, keepdim=True).values
    return scaled.masked_fill(~keep, float("-inf")).log_softmax(-1)


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=8, top_p=0.8)])
def test_logprobs_follow_the_filtered_distribution(model, filters):
    params = SamplingParams(temperature=0.7, seed=11, max_new_tokens=6, ignore_eos=True, **filters)
    for prompt, comp in zip(PROMPTS, Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, params)):
        logits, _ = training_logits(model, prompt, comp.token_ids)
        expected = _filtered_logprobs(logits, params).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        assert torch.isfinite(expected).all()  # every drawn token survived the filters
        torch.testing.assert_close(torch.tensor(comp.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_greedy_logprobs_are_untempered(model):
    comp = Engine(model, max_batch=1, max_seq_len=24).generate([PROMPTS[1]], GREEDY)[0]
    logits, _ = training_logits(model, PROMPTS[1], comp.token_ids)
    assert comp.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(comp.logprobs), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- stops
def test_logsumexp_matches_torch_with_filtered_entries():
    x = torch.randn(3, 1000, dtype=torch.float64) * 20
    x[1, ::3] = float("-inf")  # filtered tokens
    x[2, 1:] = float("-inf")  # one survivor
    torch.testing.assert_close(engine_module.logsumexp(x), torch.logsumexp(x, -1), rtol=1e-12, atol=1e-12)


def _unhash32(h: int) -> int:
    """The x with engine.hash32(x) == h (each step of the mix is invertible on 32 bits)."""
    mask = 0xFFFFFFFF
    h ^= h >> 16
    h = (h * pow(engine_module._MIX_B, -1, 1 << 32)) & mask
    h ^= (h >> 15) ^ (h >> 30)
    h = (h * pow(engine_module._MIX_A, -1, 1 << 32)) & mask
    return h ^ (h >> 16)


def test_gumbel_noise_is_finite_at_the_largest_hash():
    key, step = torch.tensor([12345]), torch.tensor([7])
    row = int(engine_module.hash32(key ^ engine_module.hash32(step)))
    top = _unhash32(0xFFFFFFFF) ^ row  # a vocabulary hash whose mixed value is all ones
    assert int(engine_module.hash32(torch.tensor([top ^ row]))) == 0xFFFFFFFF
    noise = engine_module.gumbel_noise(key, step, torch.tensor([top, 0, 1]))
    assert torch.isfinite(noise).all()
    assert torch.isfinite(engine_module.hashed_uniform(torch.tensor([0, 1 << 31]), torch.tensor([3, 4]))).all()


def test_stop_tokens_max_new_tokens_and_eos(model):
    engine = Engine(model, max_batch=2, max_seq_len=24)
    free = engine.generate([PROMPTS[1]], GREEDY)[0]
    stop = free.token_ids[2]
    cut = free.token_ids.index(stop) + 1
    got = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(stop,)))[0]
    assert got.token_ids == free.token_ids[:cut] and got.finish_reason == "stop"
    assert len(got.logprobs) == cut
    short = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))[0]
    assert short.token_ids == free.token_ids[:2] and short.finish_reason == "length"
    model.config.eos_token_id, saved = stop, model.config.eos_token_id
    try:
        eos = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=6))[0]
    finally:
        model.config.eos_token_id = saved
    assert eos.token_ids == got.token_ids and eos.finish_reason == "stop"


def test_stop_strings(model):
    tok = load_tiny_tokenizer()
    engine = Engine(model, max_batch=2, max_seq_len=40, tokenizer=tok)
    prompt = tok.encode("Alice has 3 apples.")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))[0]
    text = tok.decode(free.token_ids)
    stop_string = text[len(tok.decode(free.token_ids[:3])):][:2] or text[-1:]
    expected = next(i + 1 for i in range(len(free.token_ids)) if stop_string in tok.decode(free.token_ids[:i + 1]))
    got = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True,
                                                   stop_strings=(stop_string,)))[0]
    assert got.token_ids == free.token_ids[:expected] and got.finish_reason == "stop"
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, max_batch=1, max_seq_len=8).generate([prompt[:3]], SamplingParams(stop_strings=("x",)))


def test_invalid_requests(model):
    engine = Engine(model, max_batch=2, max_seq_len=8)
    with pytest.raises(ValueError, match="prompts\\[0\\]"):
        engine.generate([list(range(1, 9))], GREEDY)
    with pytest.raises(ValueError, match="n=3"):
        engine.generate([[1]], SamplingParams(n=3))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="speculative_tokens=-1"):
        Engine(model, max_batch=1, max_seq_len=8, speculative_tokens=-1)


# -------------------------------------------------------------------- routing replay
def test_expert_ids_replay_reproduces_logits(model):
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=5, return_expert_ids=True, ignore_eos=True)
    completions = Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS[:2], params)
    moe_layers = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
    for prompt, comp in zip(PROMPTS, completions):
        assert sorted(comp.expert_ids) == moe_layers
        total = len(prompt) + len(comp.token_ids) - 1
        for ids in comp.expert_ids.values():
            assert ids.shape == (total, model.config.num_experts_per_tok) and ids.dtype == torch.int32
        free = model(torch.tensor([prompt + comp.token_ids[:-1]]), compute_mtp=False)
        for layer, ids in comp.expert_ids.items():
            assert torch.equal(ids, free.expert_ids[layer][0])
        logits, _ = training_logits(model, prompt, comp.token_ids, expert_ids=comp.expert_ids)
        replayed = logits.log_softmax(-1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(comp.logprobs), replayed, atol=1e-4, rtol=0)
        full = {k: v.unsqueeze(0) for k, v in comp.replay_expert_ids().items()}  # over prompt + completion
        logits = model(torch.tensor([prompt + comp.token_ids]), expert_ids=full, compute_mtp=False).logits[0]
        replayed = logits[len(prompt) - 1:-1].log_softmax(-1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(comp.logprobs), replayed, atol=1e-4, rtol=0)


# ---------------------------------------------------------- sync-free inference ops
@pytest.mark.parametrize("T", [1, 5, 37])
def test_gathered_experts_equal_reference(T):
    E, H, I, k = 6, 24, 40, 3
    x, w = torch.randn(T, H), torch.rand(T, k)
    ids = torch.randint(0, E - 1, (T, k), dtype=torch.int32)  # expert E-1 gets no token
    ids[0] = torch.tensor([2, 2, 0])  # a repeated expert within a token
    gate_up, down = torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5
    torch.testing.assert_close(inference.moe_experts_gathered(x, w, ids, gate_up, down),
                               ref.moe_experts(x, w, ids, gate_up, down), atol=1e-5, rtol=1e-5)


def test_gathered_experts_chunking(monkeypatch):
    monkeypatch.setattr(inference, "_GATHER_WORKSPACE_BYTES", 1)  # one token per chunk
    x, w, ids = torch.randn(4, 8), torch.rand(4, 2), torch.randint(0, 3, (4, 2))
    gate_up, down = torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    torch.testing.assert_close(inference.moe_experts_gathered(x, w, ids, gate_up, down),
                               ref.moe_experts(x, w, ids, gate_up, down), atol=1e-5, rtol=1e-5)


def test_cached_attention_equals_reference_attention():
    B, Hq, Hkv, S, D = 2, 4, 2, 11, 8
    k_cache, v_cache = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    positions = torch.tensor([[3, 4], [8, 9]])  # two new queries per row, at different lengths
    q = torch.randn(B, Hq, 2, D)
    got = inference.cached_attention(q, k_cache, v_cache, inference.cache_attention_mask(positions, S, Hq // Hkv))
    for b in range(B):
        end = int(positions[b, -1]) + 1
        want = ref.attention(q[b:b + 1], k_cache[b:b + 1, :, :end], v_cache[b:b + 1, :, :end], causal=True)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- CLI
def test_cli_generate_tiny_preset_streams_and_reports_speed():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-m", "ringkern", "generate", "--preset", "tiny", "--prompt", "What is 2+3?",
                          "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stdout.strip().splitlines()[-1]
    assert "random weights" in res.stderr


# ------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("speculative_tokens", [0, 2])
def test_cuda_graph_decode_equals_eager(dtype, speculative_tokens):
    model = make_model("cuda", dtype)
    params = SamplingParams(temperature=0.8, top_k=20, seed=1, max_new_tokens=12, n=2, ignore_eos=True,
                            return_expert_ids=True)
    prompts = PROMPTS + [[1, 2, 3]]  # 10 samples over max_batch 4: continuous batching, buckets 1-4
    engine = functools.partial(Engine, model, max_batch=4, max_seq_len=32, speculative_tokens=speculative_tokens)
    graphed = engine().generate(prompts, params)
    eager = engine(cuda_graphs=False).generate(prompts, params)
    for g, e in zip(graphed, eager):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-5, rtol=0)
        assert all(torch.equal(g.expert_ids[k], e.expert_ids[k]) for k in g.expert_ids)


@requires_cuda
def test_cuda_engine_matches_cpu_and_training_path():
    cpu_model, gpu_model = make_model(), make_model("cuda")
    gpu = Engine(gpu_model, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    cpu = Engine(cpu_model, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    params = SamplingParams(temperature=1.0, seed=2, max_new_tokens=6, ignore_eos=True)
    for prompt, comp in zip(PROMPTS, Engine(gpu_model, max_batch=4, max_seq_len=24).generate(PROMPTS, params)):
        _, hidden = training_logits(gpu_model, prompt, comp.token_ids)
        train = ops.token_logprobs(hidden, gpu_model.lm_head.weight, torch.tensor(comp.token_ids, device="cuda"))
        torch.testing.assert_close(torch.tensor(comp.logprobs), train.cpu(), atol=1e-4, rtol=0)


@requires_cuda
def test_cuda_sync_free_ops_capture_and_match_reference():
    E, H, I, k, T = 16, 256, 128, 4, 9
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    logits, bias = torch.randn(T, E, device="cuda"), torch.zeros(E, device="cuda")
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, device="cuda") / I**0.5).bfloat16()
    kw = dict(n_group=4, topk_group=2, top_k=k, routed_scaling_factor=2.5)

    def step():
        w, ids, counts = ops.moe_route(logits, bias, **kw)
        return ids, counts, inference.moe_experts(x, w, ids, gate_up, down)

    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    want_w, want_ids, want_counts = ref.moe_route(logits, bias, **kw)
    assert torch.equal(captured[0], want_ids) and torch.equal(captured[1], want_counts)
    want = ref.moe_experts(x, want_w, want_ids, gate_up, down)
    torch.testing.assert_close(captured[2].float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(captured[2], eager[2])

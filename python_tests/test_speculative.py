"""Speculative decoding with the MTP layers: greedy equals plain decoding (d = 1, 2, 3, chained and reused
depths), the rejection rule keeps the sampling distribution (chi-square on a small vocabulary), the main
and MTP caches equal a full recompute after rejections, stops cut inside a step, batching and routing
replay keep working, acceptance statistics; the same on a GPU with CUDA graphs."""
import random

import pytest
import torch

from conftest import requires_cuda
from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams
from ringkern.engine import _noise_key, filtered_logprobs, verify_drafts
from ringkern.model import KVCache
from ringkern.tokenizer import load_tiny_tokenizer
from test_engine import PROMPTS, _filtered_logprobs, make_model

SEED = 0
GREEDY = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True, seed=SEED)


@pytest.fixture(scope="module")
def model():
    return make_model()  # tiny preset, 3 decoder layers, one MTP layer


@pytest.fixture(scope="module")
def model_two_depths():
    torch.manual_seed(1)
    model = RingFlashModel(RingConfig.from_preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def oracle_drafts(engine: Engine, reference: list[list[int]], seed: int = SEED, wrong: float = 0.5) -> None:
    """Make ``engine`` draft the reference continuations (completion i = reference[i]), except that a
    pseudo-random ``wrong`` fraction of (completion, generated index) pairs get a wrong draft: steps then
    accept some drafts and reject others, at any draft depth. Greedy only (the drafts' log-distributions
    stay the MTP head's)."""
    by_key = {_noise_key(seed, i): tokens for i, tokens in enumerate(reference)}
    vocab, draw = engine.config.vocab_size, engine._draw_draft

    def draw_oracle(logits, keys, steps, params):
        tokens, logq = draw(logits, keys, steps, params)
        want = []
        for key, step in zip(keys.tolist(), steps.tolist()):
            ref = by_key.get(key, [])
            miss = random.Random(f"{key}:{step}").random() < wrong
            want.append((ref[step] + miss) % vocab if step < len(ref) else 0)
        return torch.tensor(want, device=tokens.device), logq

    engine._draw_draft = draw_oracle


# ------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("d", [1, 2, 3])
def test_greedy_equals_plain_decoding(model, d):
    plain = Engine(model, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    engine = Engine(model, max_batch=4, max_seq_len=24, speculative_tokens=d)
    spec = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in spec]), torch.tensor([c.logprobs for c in plain]),
                               atol=1e-5, rtol=0)
    oracle_drafts(engine, [c.token_ids for c in plain])
    spec = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert 0 < engine.stats.accepted_tokens < engine.stats.drafted_tokens  # accepts and rejections
    assert engine.stats.decode_steps < len(PROMPTS) * (GREEDY.max_new_tokens - 1)  # several tokens per step


def test_greedy_chained_mtp_depths(model_two_depths):
    plain = Engine(model_two_depths, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    for d in (1, 2, 3):  # depths 1, then 1..2, then 1..2 and the last layer reused
        engine = Engine(model_two_depths, max_batch=4, max_seq_len=24, speculative_tokens=d)
        assert engine.draft_depths == min(d, 2)
        oracle_drafts(engine, [c.token_ids for c in plain])
        assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [c.token_ids for c in plain]
        assert engine.stats.accepted_tokens > 0


def test_continuous_batching_and_n_samples(model):
    prompts = [list(range(10, 20)), [7, 8], [30, 31, 32], [40], [50, 51, 52, 53]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, seed=SEED)
    plain = Engine(model, max_batch=2, max_seq_len=14).generate(prompts, params)
    engine = Engine(model, max_batch=2, max_seq_len=14, speculative_tokens=2)
    oracle_drafts(engine, [c.token_ids for c in plain])
    events = list(engine.stream(prompts, params))
    assert [[t for c, t, _ in events if c == i] for i in range(len(prompts))] == [c.token_ids for c in plain]
    sampled = SamplingParams(temperature=1.0, seed=7, max_new_tokens=5, n=3, ignore_eos=True)
    spec = Engine(model, max_batch=4, max_seq_len=16, speculative_tokens=2)
    shared = spec.generate([PROMPTS[0], PROMPTS[1]], sampled)
    separate = Engine(model, max_batch=1, max_seq_len=16, speculative_tokens=2).generate(
        [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, SamplingParams(temperature=1.0, seed=7, max_new_tokens=5, ignore_eos=True))
    assert [c.token_ids for c in shared] == [c.token_ids for c in separate]  # reproducible, batch-independent
    assert len({tuple(c.token_ids) for c in shared[:3]}) > 1


# ------------------------------------------------------------------ caches after rejections
def test_cached_mtp_forward_equals_full_recompute(model):
    """Prefill 6 tokens with the MTP layer cached (its last position a placeholder: next token unknown),
    decode 4 more through the main model, then MTP depth 1 in decode mode over positions 5..8."""
    ids = torch.tensor([[5, 9, 17, 30, 31, 44, 3, 98, 120, 7]])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model.config, 2, 16, dtype=torch.float32, mtp=True)
        prefill = model(ids[:, :6], kv_cache=cache, cache_rows=torch.tensor([1]))
        torch.testing.assert_close(prefill.mtp_hidden_states[0][:, :5], full.mtp_hidden_states[0][:, :5],
                                   atol=1e-5, rtol=0)
        decode = model(ids[:, 6:], position_ids=torch.arange(6, 10)[None], kv_cache=_row(cache, 1), compute_mtp=False)
        hidden = torch.cat([prefill.hidden_states[:, 5:], decode.hidden_states[:, :3]], dim=1)  # positions 5..8
        got, expert_ids = model.mtp_forward(1, hidden, ids[:, 6:], position_ids=torch.arange(5, 9)[None],
                                            kv_cache=_row(cache, 1))
    torch.testing.assert_close(got, full.mtp_hidden_states[0][:, 5:9], atol=1e-4, rtol=0)
    assert expert_ids.shape == (1, 4, model.config.num_experts_per_tok)
    with pytest.raises(ValueError, match="depth=2"):
        model.mtp_forward(2, hidden, ids[:, 6:], position_ids=torch.arange(5, 9)[None], kv_cache=_row(cache, 1))
    with pytest.raises(ValueError, match="mtp=True"):
        model.mtp_forward(1, hidden, ids[:, 6:], position_ids=torch.arange(5, 9)[None],
                          kv_cache=KVCache.allocate(model.config, 1, 16, dtype=torch.float32))


def _row(cache: KVCache, row: int) -> KVCache:
    """The cache as seen by a decode call whose one sequence is ``row`` (decode mode uses rows 0..B-1)."""
    view = cache.row_view(row, row + 1)
    assert all(k.data_ptr() == full[row].data_ptr() for k, full in zip(view.keys, cache.keys))  # views, no copy
    return view


@pytest.mark.parametrize("name, d", [("model", 1), ("model", 3), ("model_two_depths", 2)])
def test_caches_equal_full_recompute_after_rejections(request, name, d):
    """After generating c tokens with rejections, the main layers' keys/values equal a fresh prefill's up to
    position c-2 (the last token is never fed) and MTP depth j's up to c-1-j (its next token committed)."""
    model = request.getfixturevalue(name)
    L = model.config.num_hidden_layers
    for seed, prompt in enumerate(PROMPTS[:3]):  # a seed each: a different pattern of wrong drafts
        params = SamplingParams(temperature=0, max_new_tokens=14, ignore_eos=True, seed=seed)
        plain = Engine(model, max_batch=1, max_seq_len=32).generate([prompt], params)[0]
        engine = Engine(model, max_batch=1, max_seq_len=32, speculative_tokens=d)
        oracle_drafts(engine, [plain.token_ids], seed=seed)
        got = engine.generate([prompt], params)[0]
        assert got.token_ids == plain.token_ids and engine.stats.drafted_tokens > engine.stats.accepted_tokens > 0
        sequence = prompt + got.token_ids
        fresh = KVCache.allocate(model.config, 1, 32, dtype=torch.float32, mtp=True)
        with torch.no_grad():
            model(torch.tensor([sequence]), kv_cache=fresh, cache_rows=torch.tensor([0]))
        for layer in range(model.config.num_layers_with_mtp):
            end = len(sequence) - 1 - max(layer - L + 1, 0)  # positions [0, end) are exact
            for cache, want in ((engine.cache.keys, fresh.keys), (engine.cache.values, fresh.values)):
                torch.testing.assert_close(cache[layer][0, :, :end], want[layer][0, :, :end], atol=1e-4, rtol=0)


def test_logprobs_match_training_path(model):
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, seed=11, max_new_tokens=8, ignore_eos=True)
    for prompt, comp in zip(PROMPTS, Engine(model, max_batch=4, max_seq_len=24,
                                            speculative_tokens=2).generate(PROMPTS, params)):
        ids = torch.tensor([prompt + comp.token_ids[:-1]])
        logits = model(ids, compute_mtp=False).logits[0, len(prompt) - 1:].float()
        expected = _filtered_logprobs(logits, params).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(torch.tensor(comp.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_expert_ids_replay(model):
    params = SamplingParams(temperature=0, max_new_tokens=7, return_expert_ids=True, ignore_eos=True, seed=SEED)
    plain = Engine(model, max_batch=2, max_seq_len=24).generate(PROMPTS[:2], params)
    engine = Engine(model, max_batch=2, max_seq_len=24, speculative_tokens=2)
    oracle_drafts(engine, [c.token_ids for c in plain])
    for prompt, comp, ref in zip(PROMPTS, engine.generate(PROMPTS[:2], params), plain):
        assert comp.token_ids == ref.token_ids
        free = model(torch.tensor([prompt + comp.token_ids[:-1]]), compute_mtp=False)
        assert sorted(comp.expert_ids) == sorted(ref.expert_ids)
        for layer, ids in comp.expert_ids.items():
            assert ids.shape[0] == len(prompt) + len(comp.token_ids) - 1
            assert torch.equal(ids, free.expert_ids[layer][0])


# ---------------------------------------------------------------------------- stops
def test_stops_cut_inside_a_step(model):
    plain = Engine(model, max_batch=1, max_seq_len=24).generate([PROMPTS[1]], GREEDY)[0]
    engine = Engine(model, max_batch=1, max_seq_len=24, speculative_tokens=3)
    oracle_drafts(engine, [plain.token_ids], wrong=0.0)  # every draft right: 4 tokens a step
    stop = plain.token_ids[2]
    cut = plain.token_ids.index(stop) + 1
    got = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=7, stop_token_ids=(stop,),
                                                       seed=SEED))[0]
    assert got.token_ids == plain.token_ids[:cut] and got.finish_reason == "stop" and len(got.logprobs) == cut
    for limit in (1, 2, 5):
        short = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=limit, ignore_eos=True,
                                                             seed=SEED))[0]
        assert short.token_ids == plain.token_ids[:limit] and short.finish_reason == "length"
    full = Engine(model, max_batch=1, max_seq_len=13, speculative_tokens=3)  # 9-token prompt: room for 4
    oracle_drafts(full, [plain.token_ids], wrong=0.0)
    got = full.generate([PROMPTS[1]], GREEDY)[0]
    assert got.token_ids == plain.token_ids[:4] and got.finish_reason == "length"


def test_stop_strings(model):
    tok = load_tiny_tokenizer()
    prompt = tok.encode("Alice has 3 apples.")
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, seed=SEED)
    free = Engine(model, max_batch=1, max_seq_len=40).generate([prompt], params)[0]
    text = tok.decode(free.token_ids)
    stop_string = text[len(tok.decode(free.token_ids[:3])):][:2] or text[-1:]
    expected = next(i + 1 for i in range(len(free.token_ids)) if stop_string in tok.decode(free.token_ids[:i + 1]))
    engine = Engine(model, max_batch=1, max_seq_len=40, tokenizer=tok, speculative_tokens=3)
    oracle_drafts(engine, [free.token_ids], wrong=0.0)
    got = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, seed=SEED,
                                                   stop_strings=(stop_string,)))[0]
    assert got.token_ids == free.token_ids[:expected] and got.finish_reason == "stop"


def test_stats_and_argument_errors(model):
    engine = Engine(model, max_batch=4, max_seq_len=24, speculative_tokens=2)
    engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, ignore_eos=True))
    s = engine.stats
    assert s.decode_rows >= s.decode_steps > 0 and s.drafted_tokens == 2 * s.decode_rows
    assert 0 <= s.accepted_tokens <= s.drafted_tokens and s.acceptance_rate == s.accepted_tokens / s.drafted_tokens
    assert s.decode_tokens == len(PROMPTS) * 5  # the first token of each comes from the prefill
    assert 1 <= s.tokens_per_step <= 3 and s.tokens_per_step == s.decode_tokens / s.decode_rows
    plain = Engine(model, max_batch=4, max_seq_len=24)
    plain.generate(PROMPTS, GREEDY)
    assert plain.stats.tokens_per_step == 1 and plain.stats.drafted_tokens == 0
    with pytest.raises(ValueError, match="speculative_tokens=-1"):
        Engine(model, speculative_tokens=-1)
    no_mtp = RingFlashModel(RingConfig.from_preset("tiny", num_hidden_layers=1, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="speculative_tokens=1.*num_nextn_predict_layers=0"):
        Engine(no_mtp, speculative_tokens=1)


# -------------------------------------------------------------------------- sampling
def test_verify_drafts_rule_on_a_known_case():
    """p = [.5, .5, 0], q = [1, 0, 0]: draft 0 is accepted half the time, a rejection draws token 1."""
    logits = torch.tensor([[[0.0, 0.0, -float("inf")], [0.0, 5.0, 0.0]]]).expand(4000, 2, 3)
    drafts, logq = torch.zeros(4000, 1, dtype=torch.long), torch.tensor([0.0, -float("inf"), -float("inf")])
    params = SamplingParams(temperature=1.0)
    tokens, logprobs, accepted = verify_drafts(logits, drafts, logq.expand(4000, 1, 3), params,
                                               torch.arange(4000), torch.zeros(4000, dtype=torch.long),
                                               torch.arange(3))
    assert abs(accepted.float().mean().item() - 0.5) < 0.05
    assert torch.equal(tokens[:, 0], torch.where(accepted > 0, 0, 1))
    torch.testing.assert_close(logprobs[:, 0], torch.full((4000,), 0.5).log())


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (cells of expected < 5 pooled)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True, seed=5),
                                    SamplingParams(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=3,
                                                   ignore_eos=True, seed=6)])
def test_sampling_distribution_chi_square(params):
    """Generated tokens 2 and 3 (the first verify step's correction or accepted draft, and its bonus or
    the next step's token) against the exact marginals of the main model, over 3000 seeded samples."""
    torch.manual_seed(2)
    config = RingConfig.from_preset("tiny", vocab_size=16, hidden_size=32, intermediate_size=32,
                                    moe_intermediate_size=16, num_hidden_layers=1, first_k_dense_replace=1,
                                    num_attention_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    n_group=2, topk_group=2)
    tiny = RingFlashModel(config)
    with torch.no_grad():
        tiny.lm_head.weight.normal_(0, 0.5)  # distinct p and q, so steps both accept and reject
    prompt, samples, V = [3, 7, 1], 3000, 16
    engine = Engine(tiny, max_batch=256, max_seq_len=8, speculative_tokens=1)
    got = torch.tensor([c.token_ids for c in engine.generate([prompt] * samples, params)])  # [samples, 3]
    assert 0.2 < engine.stats.acceptance_rate < 0.95
    with torch.no_grad():  # exact: p(x1) p(x2 | x1) p(x3 | x1, x2) over all V^2 prefixes
        seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])  # [V^2, 5]
        logp = filtered_logprobs(tiny(seqs, compute_mtp=False).logits[:, 2:].reshape(-1, V).float(), params)
        logp = logp.view(V * V, 3, V).double()
    p1 = logp[0, 0].exp()  # [V]
    p2_given_1 = logp[::V, 1].exp()  # [V, V]: row x1
    p3_given_12 = logp[:, 2].exp().view(V, V, V)
    p12 = p1.view(V, 1) * p2_given_1
    marginal2 = p12.sum(0)
    marginal3 = (p12.unsqueeze(-1) * p3_given_12).sum((0, 1))
    for position, probs in ((1, marginal2), (2, marginal3)):
        counts = torch.bincount(got[:, position], minlength=V)
        assert _chi_square_p_value(counts, probs) > 1e-3, (position, counts, probs * samples)
    # The test has power: the same counts are far from the draft model's own distribution of token 2.
    with torch.no_grad():
        mtp = tiny(seqs[::V, :4]).mtp_logits[0][:, 3].float()  # [V] rows x1: q(x2 | prompt, x1)
    q2 = (p1.view(V, 1) * filtered_logprobs(mtp, params).exp().double()).sum(0)
    assert _chi_square_p_value(torch.bincount(got[:, 1], minlength=V), q2) < 1e-6


# ------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("d", [1, 2])
def test_cuda_greedy_equals_plain_and_cpu(d):
    cpu_model, gpu_model = make_model(), make_model("cuda")
    plain = Engine(gpu_model, max_batch=4, max_seq_len=24).generate(PROMPTS, GREEDY)
    cpu = Engine(cpu_model, max_batch=4, max_seq_len=24, speculative_tokens=d).generate(PROMPTS, GREEDY)
    engine = Engine(gpu_model, max_batch=4, max_seq_len=24, speculative_tokens=d)
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == [c.token_ids for c in plain]
    assert [c.token_ids for c in cpu] == [c.token_ids for c in plain]
    # the oracle drafter reads its inputs on the host, which a CUDA graph cannot capture: run it eagerly
    eager = Engine(gpu_model, max_batch=4, max_seq_len=24, speculative_tokens=d, cuda_graphs=False)
    oracle_drafts(eager, [c.token_ids for c in plain])
    assert [c.token_ids for c in eager.generate(PROMPTS, GREEDY)] == [c.token_ids for c in plain]
    assert 0 < eager.stats.accepted_tokens < eager.stats.drafted_tokens

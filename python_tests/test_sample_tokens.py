"""The fused sampling op (csrc/sampling/sample_tokens.cu) against its reference; CUDA tests skip on the CPU."""
import math

import pytest
import torch

from conftest import requires_cuda
from ringkern.engine import SamplingParams, filtered_logprobs, gumbel_noise, hash32, logsumexp
from ringkern.ops.inference import sample_tokens_reference


TEMPERATURES = [0.0, 0.7, 1.0, 1.3]
NEAR_TIE = 1e-5


def _inputs(B, V, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * scale).to(device, dtype)
    keys = torch.randint(0, 2**32, (B,), generator=g).to(device)
    steps = torch.randint(0, 10**6, (B,), generator=g).to(device)
    return logits, keys, steps


def _sample_keys(logits, keys, steps, temperature):
    """The reference's log-probs and Gumbel-max keys [B, V] (greedy: the logits as keys)."""
    z = logits.float()
    if temperature == 0:
        return z - logsumexp(z).unsqueeze(-1), z
    scaled = z / temperature
    logp = scaled - logsumexp(scaled).unsqueeze(-1)
    return logp, logp + gumbel_noise(keys, steps, hash32(torch.arange(z.shape[-1], device=z.device)))


def _check_against_reference(logits, keys, steps, temperature):
    """Tokens as the reference's, but for fp32 near-ties of its keys (rare), and their log-probs within 1e-4."""
    tokens, logprobs = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert tokens.shape == logprobs.shape == (logits.shape[0],)
    want, _ = sample_tokens_reference(logits, keys, steps, temperature)
    logp, draw_keys = _sample_keys(logits, keys, steps, temperature)
    differ = (tokens != want).nonzero().flatten().tolist()
    if temperature == 0:
        assert not differ
    for b in differ:  # the kernel's token must tie the reference's best key up to fp32 rounding
        assert draw_keys[b, tokens[b]] >= draw_keys[b].max() - NEAR_TIE, (b, tokens[b].item(), want[b].item())
    assert len(differ) <= 1, differ
    torch.testing.assert_close(logprobs, logp.gather(1, tokens.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-4)
    return tokens, logprobs


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_filtered_sampler_without_filters(temperature, dtype):
    """The op's contract equals the engine's general (filtering) sampler when no filter is set."""
    logits, keys, steps = _inputs(5, 1000, dtype, seed=1)
    params = SamplingParams(temperature=temperature)
    logp = filtered_logprobs(logits.float(), params)
    draw = logp if params.greedy else logp + gumbel_noise(keys, steps, hash32(torch.arange(logits.shape[1])))
    tokens = draw.argmax(-1)
    got = sample_tokens_reference(logits, keys, steps, temperature)
    assert torch.equal(got[0], tokens)
    torch.testing.assert_close(got[1], logp.gather(1, tokens.unsqueeze(1)).squeeze(1), rtol=0, atol=1e-6)


def test_cpu_kernel_is_the_reference_and_opcheck():
    logits, keys, steps = _inputs(3, 100)
    for temperature in TEMPERATURES:
        got = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
        want = sample_tokens_reference(logits, keys, steps, temperature)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        torch.library.opcheck(torch.ops.ringkern.sample_tokens.default, (logits, keys, steps, temperature))


@requires_cuda
@pytest.mark.parametrize("V", [1, 7, 1000, 5003, 157184])
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_cuda_matches_reference(temperature, dtype, B, V):
    logits, keys, steps = _inputs(B, V, dtype, "cuda", seed=B * V + int(10 * temperature))
    _check_against_reference(logits, keys, steps, temperature)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_rows_and_storage_offset(dtype):
    """Rows and chunks starting off a 16-byte boundary (the kernel's scalar head and tail)."""
    B, V = 5, 4099
    logits, keys, steps = _inputs(B, V, dtype, "cuda", seed=3)
    shifted = torch.empty(B * V + 3, dtype=dtype, device="cuda")[3:].view(B, V)
    shifted.copy_(logits)
    assert shifted.data_ptr() % 16 != 0
    for temperature in TEMPERATURES:
        got = _check_against_reference(shifted, keys, steps, temperature)
        want = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)  # other vector boundaries:
        assert torch.equal(got[0], want[0])  # the same argmax, the sums in another order
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_ties_pick_the_lowest_index(dtype):
    B, V = 4, 157184
    logits = torch.randn(B, V, device="cuda").to(dtype)
    logits[0] = 0  # all equal: token 0, log-prob -log V
    logits[1, [157000, 70000, 3]] = 9.0  # maxima in different blocks
    logits[2, [150001, 80001]] = 9.0
    logits[3, [1001, 1002, 1000]] = 9.0  # maxima in one block, one 16-byte vector
    keys, steps = torch.zeros(B, dtype=torch.long, device="cuda"), torch.zeros(B, dtype=torch.long, device="cuda")
    tokens, logprobs = _check_against_reference(logits, keys, steps, 0.0)
    assert tokens.tolist() == [0, 3, 80001, 1000]
    assert abs(logprobs[0].item() + math.log(V)) < 1e-4


@requires_cuda
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rows_with_neg_inf(temperature, dtype):
    B, V = 4, 157184
    logits, keys, steps = _inputs(B, V, dtype, "cuda", seed=7)
    logits[0, :100000] = float("-inf")  # whole blocks of -inf
    logits[1, ::2] = float("-inf")
    logits[2, 1:] = float("-inf")  # one finite entry: token 0, log-prob 0
    logits[3, torch.randperm(V, device="cuda")[: V - 10]] = float("-inf")
    tokens, logprobs = _check_against_reference(logits, keys, steps, temperature)
    if not _sample_keys(logits, keys, steps, temperature)[1][2].isnan().any():  # no +inf noise on a -inf logit
        assert tokens[2].item() == 0 and logprobs[2].item() == 0.0


@requires_cuda
def test_cuda_greedy_nan_wins_as_in_torch_argmax():
    logits, keys, steps = _inputs(2, 5003, device="cuda")
    logits[0, [4000, 17]] = float("nan")
    tokens, logprobs = torch.ops.ringkern.sample_tokens(logits, keys, steps, 0.0)
    assert tokens.tolist() == sample_tokens_reference(logits, keys, steps, 0.0)[0].tolist()
    assert tokens[0].item() == 17 and logprobs[0].isnan() and not logprobs[1].isnan()


@requires_cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic(temperature, dtype):
    logits, keys, steps = _inputs(64, 157184, dtype, "cuda", seed=11)
    first = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
    for _ in range(3):
        again = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@requires_cuda
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(temperature, dtype):
    logits, keys, steps = _inputs(8, 157184, dtype, "cuda", seed=5)
    tokens, logprobs = torch.empty(8, dtype=torch.long, device="cuda"), torch.empty(8, device="cuda")
    torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
        tokens.copy_(out[0])
        logprobs.copy_(out[1])
    for seed in (6, 7):  # new inputs in the same buffers
        new_logits, new_keys, new_steps = _inputs(8, 157184, dtype, "cuda", seed=seed)
        logits.copy_(new_logits)
        keys.copy_(new_keys)
        steps.copy_(new_steps)
        graph.replay()
        want = torch.ops.ringkern.sample_tokens(logits, keys, steps, temperature)
        assert torch.equal(tokens, want[0]) and torch.equal(logprobs, want[1])


@requires_cuda
def test_cuda_bad_arguments_name_the_argument():
    logits, keys, steps = _inputs(3, 1000, device="cuda")
    op = torch.ops.ringkern.sample_tokens
    cases = [
        ("noise_keys", (logits, keys.int(), steps, 1.0)),
        ("noise_keys", (logits, keys.cpu(), steps, 1.0)),
        ("steps", (logits, keys, torch.cat([steps, steps[:1]]), 1.0)),
        ("steps", (logits, keys, steps.view(3, 1), 1.0)),
        ("temperature", (logits, keys, steps, -0.5)),
        ("temperature", (logits, keys, steps, float("nan"))),
        ("logits", (logits[0], keys, steps, 1.0)),
        ("logits", (logits.half(), keys, steps, 1.0)),
        ("logits", (logits.t(), keys, steps, 1.0)),
        ("logits", (logits[:, :0], keys, steps, 1.0)),
    ]
    for name, args in cases:
        with pytest.raises(RuntimeError, match=f"'{name}'"):
            op(*args)

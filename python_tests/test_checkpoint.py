"""Published-format checkpoints: round trips, sharding, layout, validation errors, atomic save."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ringkern import checkpoint as ck
from ringkern.checkpoint import (CheckpointError, load_pretrained, published_tensor_shapes, published_to_model,
                                 save_pretrained)
from ringkern.config import RingConfig
from ringkern.model import RingFlashModel


@pytest.fixture(scope="module")
def config() -> RingConfig:
    return RingConfig.from_preset("tiny")


def random_model(config: RingConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> RingFlashModel:
    torch.manual_seed(seed)
    model = RingFlashModel(config).to(dtype)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.uniform_(-1e-3, 1e-3)  # values bf16 cannot hold exactly
    return model


@pytest.fixture(scope="module")
def model(config) -> RingFlashModel:
    return random_model(config)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_pretrained(model, path, max_shard_size=2**20)
    return path


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert dict(a.named_buffers()).keys() == dict(b.named_buffers()).keys()


def disk_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite_single_file(path: Path, edit) -> None:
    """Replace the checkpoint's shards by one model.safetensors holding edit(tensors)."""
    tensors = edit(disk_tensors(path))
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / ck.INDEX_FILE).unlink()
    save_file(tensors, path / ck.SINGLE_FILE)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------- names
def test_published_shapes_count_flash_parameters():
    shapes = published_tensor_shapes(RingConfig.from_preset("ring-flash-2.0"))
    params = sum(math.prod(s) for n, (s, _) in shapes.items() if not n.endswith("expert_bias"))
    assert params == 102_889_697_280  # SPEC.md: the flash config without MTP
    assert shapes["model.layers.1.mlp.gate.expert_bias"] == ((256,), torch.float32)
    assert "model.layers.32.eh_proj.weight" not in shapes
    mtp = published_tensor_shapes(RingConfig.from_preset("ling-flash-2.0"))
    assert mtp["model.layers.32.eh_proj.weight"] == ((4096, 8192), None)
    assert mtp["model.layers.32.mlp.experts.255.down_proj.weight"] == ((4096, 1024), None)


def test_published_names_cover_model_state(config, model):
    dests = {published_to_model(n, config).key for n in published_tensor_shapes(config)}
    assert dests == set(model.state_dict())


# --------------------------------------------------------------------- round trips
def test_round_trip_fp32(model, saved):
    loaded = load_pretrained(saved)
    assert_same_state(model, loaded)
    assert json.loads((saved / "config.json").read_text())["torch_dtype"] == "float32"
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_round_trip_bf16_keeps_expert_bias_fp32(config, tmp_path):
    model = random_model(config, seed=1, dtype=torch.bfloat16)
    bias = model.model.layers[1].mlp.gate.expert_bias
    assert bias.dtype == torch.float32
    save_pretrained(model, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "bailing_moe"
    with safe_open(str(next((tmp_path / "bf16").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.expert_bias").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    loaded = load_pretrained(tmp_path / "bf16")  # dtype from config.json
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert_same_state(model, loaded)


def test_load_with_dtype_materializes_from_meta(model, saved):
    loaded = load_pretrained(saved, dtype=torch.bfloat16, device="cpu")
    want, got = model.state_dict(), loaded.state_dict()
    for k, v in got.items():
        assert not v.is_meta and v.device.type == "cpu"
        if k.endswith("expert_bias"):
            assert v.dtype == torch.float32 and torch.equal(v, want[k])
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)), k


def test_save_with_dtype_casts_per_tensor(model, tmp_path):
    save_pretrained(model, tmp_path / "c", dtype="bfloat16")
    on_disk = disk_tensors(tmp_path / "c")
    assert on_disk["lm_head.weight"].dtype == torch.bfloat16
    assert on_disk["model.layers.2.mlp.gate.expert_bias"].dtype == torch.float32
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------- layout
def test_sharding_and_index(config, saved):
    index = json.loads((saved / ck.INDEX_FILE).read_text())
    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(shards) > 3 and shards == sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(published_tensor_shapes(config))
    total = 0
    for name in shards:
        with safe_open(str(saved / name), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == name}
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert size <= 2**20 or len(keys) == 1
        total += size
    assert index["metadata"]["total_size"] == total


def test_disk_layout_is_published(config, model, saved):
    expected = published_tensor_shapes(config)
    on_disk = disk_tensors(saved)
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == {k: s for k, (s, _) in expected.items()}
    experts = model.model.layers[2].mlp.experts
    for e in (0, 7, config.num_experts - 1):
        p = f"model.layers.2.mlp.experts.{e}."
        assert torch.equal(on_disk[p + "gate_proj.weight"], experts.gate_up_proj[e, 0::2])
        assert torch.equal(on_disk[p + "up_proj.weight"], experts.gate_up_proj[e, 1::2])
        assert torch.equal(on_disk[p + "down_proj.weight"], experts.down_proj[e])
    mtp = f"model.layers.{config.num_hidden_layers}."
    assert on_disk[mtp + "eh_proj.weight"].shape == (config.hidden_size, 2 * config.hidden_size)
    assert mtp + "final_layernorm.weight" in on_disk


def test_hand_built_published_checkpoint_loads(config, tmp_path):
    """Per-expert tensors written with safetensors directly (as the published checkpoints are)."""
    torch.manual_seed(3)
    tensors = {n: torch.randn(s, dtype=d or torch.bfloat16) for n, (s, d) in published_tensor_shapes(config).items()}
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    path = tmp_path / "published"
    path.mkdir()
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, path / fname, metadata={"format": "pt"})
    (path / ck.INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    (path / "config.json").write_text(json.dumps(dict(config.to_hf_dict(), torch_dtype="bfloat16")))

    model = load_pretrained(path)
    state = model.state_dict()
    for n in range(config.first_k_dense_replace, config.num_layers_with_mtp):
        stacked = model.model.layers[n].mlp.experts
        for e in range(config.num_experts):
            p = f"model.layers.{n}.mlp.experts.{e}."
            assert torch.equal(stacked.gate_up_proj[e, 0::2], tensors[p + "gate_proj.weight"])
            assert torch.equal(stacked.gate_up_proj[e, 1::2], tensors[p + "up_proj.weight"])
            assert torch.equal(stacked.down_proj[e], tensors[p + "down_proj.weight"])
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            assert torch.equal(state[name], t), name
    assert model.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32


def test_single_file_checkpoint(model, saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "single")
    rewrite_single_file(path, lambda t: t)
    assert_same_state(model, load_pretrained(path))


# --------------------------------------------------------------------- validation
def test_missing_tensor(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    rewrite_single_file(path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.attention.dense.weight"})
    with pytest.raises(CheckpointError, match=r"missing \(1\): model\.layers\.1\.attention\.dense\.weight"):
        load_pretrained(path)


def test_unexpected_tensor(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "u")
    rewrite_single_file(path, lambda t: dict(t, **{"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        load_pretrained(path)


def test_misshaped_tensor(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "s")
    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    rewrite_single_file(path, lambda t: dict(t, **{name: t[name][:-1].clone()}))
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): model\.layers\.3\.mlp\.experts\.5\.up_proj\.weight"):
        load_pretrained(path)


def test_long_lists_are_truncated(config, saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "t")
    rewrite_single_file(path, lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.2.mlp.experts.")})
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    n = 3 * config.num_experts
    assert f"missing ({n})" in str(err.value)
    assert f"and {n - ck.MAX_LISTED} more" in str(err.value)


def test_index_names_missing_shard(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ms")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_pretrained(path)


def test_truncated_shard_is_named(saved, tmp_path, monkeypatch):
    path = copy_checkpoint(saved, tmp_path / "tr")
    victim = sorted(path.glob("model-*.safetensors"))[2]
    os.truncate(victim, victim.stat().st_size - 100)
    copied = []
    monkeypatch.setattr(ck, "_copy_tensors", lambda *a: copied.append(a))
    with pytest.raises(CheckpointError, match=rf"{victim.name}.*truncated"):
        load_pretrained(path)
    assert not copied  # nothing was loaded


def test_garbage_shard_is_named(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "g")
    victim = sorted(path.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\x07" * 64)
    with pytest.raises(CheckpointError, match=victim.name):
        load_pretrained(path)


# --------------------------------------------------------------------- atomic save
class Crash(RuntimeError):
    pass


def crash_on_second_shard(monkeypatch):
    real = ck._write_safetensors
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise Crash("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "_write_safetensors", flaky)
    return calls


def test_crash_mid_save_keeps_previous_checkpoint(config, model, tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_pretrained(model, path, max_shard_size=2**20)
    calls = crash_on_second_shard(monkeypatch)
    with pytest.raises(Crash):
        save_pretrained(random_model(config, seed=9), path, max_shard_size=2**20)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    monkeypatch.undo()
    assert_same_state(model, load_pretrained(path))


def test_crash_mid_save_leaves_nothing_at_new_path(model, tmp_path, monkeypatch):
    crash_on_second_shard(monkeypatch)
    with pytest.raises(Crash):
        save_pretrained(model, tmp_path / "new", max_shard_size=2**20)
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_restores_previous(config, model, tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_pretrained(model, path, max_shard_size=2**20)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new checkpoint in
            raise Crash("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(Crash):
        save_pretrained(random_model(config, seed=5), path, max_shard_size=2**20)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert_same_state(model, load_pretrained(path))


def test_overwrite_replaces_checkpoint(config, tmp_path):
    path = tmp_path / "ck"
    save_pretrained(random_model(config, seed=1), path, max_shard_size=2**20)
    newer = random_model(config, seed=2)
    save_pretrained(newer, path)  # one shard now: stale shard files must not survive
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                      ck.INDEX_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert_same_state(newer, load_pretrained(path))


def test_tokenizer_is_saved(model, tmp_path):
    from ringkern.tokenizer import RingTokenizer, load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    save_pretrained(model, tmp_path / "a", tokenizer=tok)
    assert RingTokenizer.from_file(tmp_path / "a").encode("12 apples") == tok.encode("12 apples")
    save_pretrained(model, tmp_path / "b", tokenizer=tmp_path / "a" / "tokenizer.json")
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()


def test_model_methods_delegate(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert_same_state(model, RingFlashModel.from_pretrained(tmp_path / "m"))


def test_refuses_to_replace_unrelated_directory(model, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_pretrained(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

"""Read and write checkpoints in the published Ring/Ling 2.0 ("BailingMoeV2") format.

On disk (the layout of the published checkpoints): ``config.json``, sharded
``model-0000i-of-0000N.safetensors`` files (or one ``model.safetensors``) and
``model.safetensors.index.json``; every routed expert is its own set of tensors
(``model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight``); expert biases are fp32.

In memory, :class:`ringkern.model.RingFlashModel` stacks each MoE layer's experts for grouped GEMMs:
``experts.gate_up_proj`` [E, 2I, H] (gate and up rows interleaved: row 2i is gate_i, 2i + 1 up_i) and
``experts.down_proj`` [E, H, I]. The mapping between the two is :func:`published_to_model`; everything else
has the same name.

Both directions stream one tensor at a time, so a 100B checkpoint never needs a second copy of the
model in memory: :func:`save_pretrained` writes the safetensors files itself from precomputed headers,
and :func:`load_pretrained` builds the model on the meta device, allocates it once in the target
dtype and copies each tensor from a memory-mapped shard into place. Everything about a checkpoint
(file list, sizes, names, shapes) is validated before the first tensor is copied.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import RingConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
MAX_LISTED = 10  # names listed per category in an error message

_DTYPE_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _code
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing/extra/mis-shaped tensors, missing or corrupt files."""


# ====================================================================== names and shapes
def published_tensor_shapes(config: RingConfig) -> dict[str, tuple[Shape, torch.dtype | None]]:
    """Every tensor name of the published format for ``config``, in file order, with its shape.

    The dtype is fixed (fp32) only for ``mlp.gate.expert_bias``; other tensors take the checkpoint's dtype.
    MTP layers (index >= num_hidden_layers) are full MoE layers plus enorm/hnorm/eh_proj/final_layernorm.
    """
    c = config
    H, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    out: dict[str, tuple[Shape, torch.dtype | None]] = {"model.word_embeddings.weight": ((c.vocab_size, H), None)}

    def add(name: str, shape: Shape, dtype: torch.dtype | None = None) -> None:
        out[name] = (tuple(shape), dtype)

    for n in range(c.num_layers_with_mtp):
        p = f"model.layers.{n}."
        add(p + "input_layernorm.weight", (H,))
        add(p + "post_attention_layernorm.weight", (H,))
        add(p + "attention.query_key_value.weight", (qkv_rows, H))
        if c.use_qk_norm:
            add(p + "attention.query_layernorm.weight", (c.head_dim,))
            add(p + "attention.key_layernorm.weight", (c.head_dim,))
        add(p + "attention.dense.weight", (H, c.num_attention_heads * c.head_dim))
        if not c.is_moe_layer(n):
            add(p + "mlp.gate_proj.weight", (c.intermediate_size, H))
            add(p + "mlp.up_proj.weight", (c.intermediate_size, H))
            add(p + "mlp.down_proj.weight", (H, c.intermediate_size))
        else:
            add(p + "mlp.gate.weight", (E, H))
            if c.moe_router_enable_expert_bias:
                add(p + "mlp.gate.expert_bias", (E,), torch.float32)
            for e in range(E):
                add(p + f"mlp.experts.{e}.gate_proj.weight", (I, H))
                add(p + f"mlp.experts.{e}.up_proj.weight", (I, H))
                add(p + f"mlp.experts.{e}.down_proj.weight", (H, I))
            if c.num_shared_experts:
                S = I * c.num_shared_experts
                add(p + "mlp.shared_experts.gate_proj.weight", (S, H))
                add(p + "mlp.shared_experts.up_proj.weight", (S, H))
                add(p + "mlp.shared_experts.down_proj.weight", (H, S))
        if n >= c.num_hidden_layers:  # MTP
            add(p + "enorm.weight", (H,))
            add(p + "hnorm.weight", (H,))
            add(p + "eh_proj.weight", (H, 2 * H))
            add(p + "final_layernorm.weight", (H,))
    add("model.norm.weight", (H,))
    add("lm_head.weight", (c.vocab_size, H))
    return out


@dataclass(frozen=True)
class Destination:
    """Where a published tensor lives in the model: ``state_dict()[key][index]`` (index None: the whole tensor)."""

    key: str
    index: tuple | None = None

    def view(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        t = state[self.key]
        return t if self.index is None else t[self.index]


def published_to_model(name: str, config: RingConfig) -> Destination:
    """The model tensor (and slice) holding published tensor ``name``: experts go into the stacked params."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return Destination(name)
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    I = config.moe_intermediate_size
    if proj == "down_proj":
        return Destination(f"{prefix}.down_proj", (e,))
    rows = slice(0, 2 * I, 2) if proj == "gate_proj" else slice(1, 2 * I, 2)
    return Destination(f"{prefix}.gate_up_proj", (e, rows))


def _is_expert_bias(name: str) -> bool:
    return name.endswith("expert_bias")


def _limited(names: Iterable[str]) -> str:
    names = sorted(names, key=_natural_key)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: torch.dtype | str | None, config: RingConfig) -> torch.dtype:
    """The model dtype of a load: ``dtype``, else config.json's ``torch_dtype``."""
    value = config.torch_dtype if dtype is None else dtype
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={value!r}: expected a floating torch dtype such as 'bfloat16'")
    return resolved


# ====================================================================== safetensors I/O
def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy if it is contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_safetensors(path: Path, entries: list[tuple[str, Shape, torch.dtype]], get_tensor) -> None:
    """Write one safetensors file, streaming: the header is computed from shapes, then each tensor from
    ``get_tensor(name)`` (already in its target dtype, any device) is written and dropped."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in entries:
            t = get_tensor(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"{name}: tensor is {tuple(t.shape)} {t.dtype}, header says {shape} {dtype}")
            f.write(_tensor_bytes(t.cpu()))
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: Shape
    dtype_code: str  # safetensors code, e.g. "BF16"


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, checking the file size against the header
    (a truncated or corrupt file raises :class:`CheckpointError` naming it)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file has {len(head)} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out, end = {}, 0
        spans = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            shape, (begin, stop) = tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            code = meta["dtype"]
            itemsize = _ST_TO_DTYPE[code].itemsize if code in _ST_TO_DTYPE else None
            if itemsize is not None and stop - begin != math.prod(shape) * itemsize:
                raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {shape} {code}")
            spans.append((begin, stop, name))
            out[name] = TensorInfo(path.name, shape, code)
            end = max(end, stop)
        spans.sort()
        pos = 0
        for begin, stop, name in spans:
            if begin != pos or stop < begin:
                raise ValueError(f"tensor {name}: data_offsets [{begin}, {stop}] leave a hole or overlap at {pos}")
            pos = stop
        if 8 + n + end != size:
            raise ValueError(f"header describes {8 + n + end} bytes but the file has {size} (truncated?)")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from None
    return out


# ====================================================================== save
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | str | None = None, tokenizer: Any = None) -> Path:
    """Write ``model`` to directory ``path`` in the published format, atomically.

    dtype: cast floating tensors to this dtype on the way (one tensor at a time); expert biases stay fp32.
    tokenizer: optional RingTokenizer / ``tokenizers.Tokenizer`` (anything with ``save``) or a path to a
    tokenizer.json (or a directory holding one), written as ``path/tokenizer.json``.

    Everything is written into a hidden temporary sibling directory and fsynced, then renamed into
    place; an existing ``path`` (a previous checkpoint: replaced as a whole, other files in it included)
    is moved aside first and deleted only after the new one is in place, so a crash never leaves an
    incomplete checkpoint at ``path``. Returns ``path``.
    """
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("save_pretrained: safetensors data is little-endian; big-endian hosts are unsupported")
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size={max_shard_size}: expected > 0")
    config: RingConfig = model.config
    path = Path(path)
    _check_replaceable(path)
    state = model.state_dict()
    entries = _published_entries(config, state, None if dtype is None else resolve_dtype(dtype, config))
    shards = _plan_shards(entries, max_shard_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_checkpoint(tmp, config, state, entries, shards, tokenizer)
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    """``path`` is replaced as a whole: refuse a file, or a non-empty directory that is not a checkpoint."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"save_pretrained: {path} exists and is not a directory")
    entries = {p.name for p in path.iterdir()}
    looks_like_checkpoint = CONFIG_FILE in entries or any(n.endswith(".safetensors") for n in entries)
    if entries and not looks_like_checkpoint:
        raise CheckpointError(f"save_pretrained: refusing to replace {path}: a non-empty directory that holds no "
                              f"checkpoint ({CONFIG_FILE} or *.safetensors)")


def _published_entries(config: RingConfig, state: dict[str, torch.Tensor],
                       dtype: torch.dtype | None) -> list[tuple[str, Shape, torch.dtype]]:
    """(published name, shape, dtype on disk) for every tensor, checking the model matches its config."""
    expected = published_tensor_shapes(config)
    covered, entries, problems = set(), [], []
    for name, (shape, fixed) in expected.items():
        dest = published_to_model(name, config)
        covered.add(dest.key)
        if dest.key not in state:
            problems.append(f"{name} (model tensor {dest.key} missing)")
            continue
        src = state[dest.key]
        actual = tuple(src.shape) if dest.index is None else tuple(src[dest.index].shape)
        if actual != shape:
            problems.append(f"{name} (model has {actual}, config says {shape})")
            continue
        out_dtype = fixed or (dtype if dtype is not None and src.dtype.is_floating_point else src.dtype)
        entries.append((name, shape, out_dtype))
    # Persistent model tensors with no published name (expert_bias of a config without it is fine: zeros).
    extra = [k for k in state if k not in covered and not (_is_expert_bias(k) and not config.moe_router_enable_expert_bias)]
    if problems or extra:
        msg = "save_pretrained: the model does not match its config:"
        if problems:
            msg += f"\n  mis-shaped/missing ({len(problems)}): {_limited(problems)}"
        if extra:
            msg += f"\n  model tensors without a published name ({len(extra)}): {_limited(extra)}"
        raise CheckpointError(msg)
    return entries


def _plan_shards(entries: list[tuple[str, Shape, torch.dtype]], max_shard_size: int) -> list[list[tuple[str, Shape, torch.dtype]]]:
    """Group tensors in order into shards of at most max_shard_size bytes (a bigger tensor gets its own).
    Within a shard, wider dtypes come first so every tensor's data stays aligned to its item size."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return [sorted(s, key=lambda e: -e[2].itemsize) for s in shards]


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_checkpoint(directory: Path, config: RingConfig, state: dict[str, torch.Tensor],
                      entries: list, shards: list, tokenizer: Any) -> None:
    weights_dtype = next((d for n, _, d in entries if not _is_expert_bias(n) and d.is_floating_point), torch.float32)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = _dtype_name(weights_dtype)
    _write_json(directory / CONFIG_FILE, hf)

    dtype_of = {n: d for n, _, d in entries}

    def get_tensor(name: str) -> torch.Tensor:  # a view of the model tensor, cast alone if needed
        return published_to_model(name, config).view(state).detach().to(dtype=dtype_of[name])

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = _shard_name(i, len(shards))
        _write_safetensors(directory / fname, shard, get_tensor)
        for name, shape, dtype in shard:
            weight_map[name] = fname
            total += math.prod(shape) * dtype.itemsize
    order = {n: k for k, (n, _, _) in enumerate(entries)}
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items(), key=lambda kv: order[kv[0]]))}
    _write_json(directory / INDEX_FILE, index)
    if tokenizer is not None:
        _write_tokenizer(directory, tokenizer)


def _write_tokenizer(directory: Path, tokenizer: Any) -> None:
    target = directory / TOKENIZER_FILE
    if hasattr(tokenizer, "save"):
        tokenizer.save(str(target))
    else:
        src = Path(tokenizer)
        src = src / TOKENIZER_FILE if src.is_dir() else src
        if not src.is_file():
            raise FileNotFoundError(f"save_pretrained: tokenizer file {src} not found")
        shutil.copyfile(src, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def _replace_dir(new: Path, path: Path) -> None:
    """Move directory ``new`` to ``path``; an existing ``path`` is renamed aside and deleted afterwards."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:  # put the previous checkpoint back
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ====================================================================== load
def checkpoint_tensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint directory ``path`` (name -> file, shape, dtype), validating the
    index against the shard files and each file's size against its header."""
    path = Path(path)
    index_file, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file}: not a safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index_file} names shard files that do not exist: {_limited(missing)}")
    elif single.is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {INDEX_FILE} and no {SINGLE_FILE}")

    tensors: dict[str, TensorInfo] = {}
    duplicates = []
    for fname in files:
        for name, info in read_safetensors_header(path / fname).items():
            if name in tensors:
                duplicates.append(f"{name} ({tensors[name].file} and {fname})")
            tensors[name] = info
    if duplicates:
        raise CheckpointError(f"{path}: tensors stored twice: {_limited(duplicates)}")
    if weight_map is not None:
        wrong = [f"{n} (index: {weight_map.get(n)}, found in: {tensors[n].file if n in tensors else 'no shard'})"
                 for n in set(weight_map) | set(tensors)
                 if n not in tensors or weight_map.get(n) != tensors[n].file]
        if wrong:
            raise CheckpointError(f"{index_file} disagrees with the shard files: {_limited(wrong)}")
    return tensors


def validate_checkpoint(tensors: dict[str, TensorInfo], config: RingConfig, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped tensors."""
    expected = published_tensor_shapes(config)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    bad = []
    for name, info in tensors.items():
        if name not in expected:
            continue
        shape, fixed = expected[name]
        if info.shape != shape:
            bad.append(f"{name} {list(info.shape)} (expected {list(shape)})")
        elif info.dtype_code not in _FLOAT_CODES:
            bad.append(f"{name} dtype {info.dtype_code} (expected a floating dtype)")
    if missing or unexpected or bad:
        parts = [f"{where} does not match the config:"]
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
            if names:
                parts.append(f"  {label} ({len(names)}): {_limited(names)}")
        raise CheckpointError("\n".join(parts))


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, model_cls: type | None = None) -> nn.Module:
    """Load a published-format checkpoint directory into a new model.

    dtype: the model's dtype (None: config.json's ``torch_dtype``); expert biases are always fp32.
    device: where the weights go (default CPU). model_cls: default :class:`ringkern.model.RingFlashModel`.
    Validates the whole checkpoint first (:class:`CheckpointError`), then builds the model on the meta
    device, allocates it once on ``device`` and streams the shards in, one tensor at a time.
    """
    path = Path(path)
    config, tensors = open_checkpoint(path)
    if model_cls is None:
        from .model import RingFlashModel as model_cls
    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype=resolve_dtype(dtype, config))  # the routers keep expert_bias fp32 (Router._apply)
    model.to_empty(device=torch.device("cpu") if device is None else device)
    state = model.state_dict()
    fill_from_checkpoint(path, tensors, config, model, lambda name, dest: (dest.view(state), ()))
    return model


def open_checkpoint(path: Path) -> tuple[RingConfig, dict[str, TensorInfo]]:
    """(config, tensors on disk) of a published checkpoint directory, validated (:class:`CheckpointError`)."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    config = RingConfig.from_json(config_file)
    tensors = checkpoint_tensors(path)
    validate_checkpoint(tensors, config, where=str(path))
    return config, tensors


def fill_from_checkpoint(path: Path, tensors: dict[str, TensorInfo], config: RingConfig, model: nn.Module,
                         target: Callable[[str, Destination], tuple[torch.Tensor, tuple] | None]) -> None:
    """Copy the checkpoint's tensors into an allocated (``to_empty``) ``model``, one tensor at a time.

    target(name, destination) -> (the tensor to fill, the index of the part of the tensor on disk that
    goes there, () for all of it), or None to skip it (a part another rank holds).
    """
    state = model.state_dict()
    dests = {name: published_to_model(name, config) for name in tensors}
    unfilled = _unfilled(state, dests.values(), config)
    if unfilled:
        raise CheckpointError(f"{type(model).__name__} has tensors the published format does not hold: "
                              f"{_limited(unfilled)}")
    _copy_tensors(path, tensors, lambda name: target(name, dests[name]))
    with torch.no_grad():
        for key, t in state.items():  # expert_bias of a config without router bias: not on disk
            if _is_expert_bias(key) and not config.moe_router_enable_expert_bias:
                t.zero_()
    _reset_non_persistent(model)


def _unfilled(state: dict[str, torch.Tensor], dests: Iterable[Destination], config: RingConfig) -> list[str]:
    covered = {d.key for d in dests}
    return [k for k in state if k not in covered and not (_is_expert_bias(k) and not config.moe_router_enable_expert_bias)]


@torch.no_grad()
def _copy_tensors(path: Path, tensors: dict[str, TensorInfo], target) -> None:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for fname in sorted(by_file):
        try:
            with safe_open(str(path / fname), framework="pt", device="cpu") as f:
                for name in by_file[fname]:
                    if (where := target(name)) is not None:
                        dest, index = where
                        dest.copy_(f.get_slice(name)[index] if index else f.get_tensor(name))
        except CheckpointError:
            raise
        except Exception as err:  # safetensors' own checks; the headers were validated already
            raise CheckpointError(f"reading {path / fname}: {err}") from err


def _reset_non_persistent(model: nn.Module) -> None:
    """Non-persistent buffers are not in checkpoints; after ``to_empty`` they hold garbage."""
    reset = getattr(model, "reset_non_persistent_buffers", None)
    if callable(reset):
        reset()
        return
    persistent = set(model.state_dict())
    stale = [n for n, _ in model.named_buffers() if n not in persistent]
    if stale:
        warnings.warn(f"{type(model).__name__} has non-persistent buffers {_limited(stale)} but no "
                      "reset_non_persistent_buffers(); they are uninitialized after load_pretrained", stacklevel=3)


__all__ = ["CheckpointError", "Destination", "TensorInfo", "checkpoint_tensors", "fill_from_checkpoint",
           "load_pretrained", "open_checkpoint", "resolve_dtype",
           "published_tensor_shapes", "published_to_model", "read_safetensors_header", "save_pretrained",
           "validate_checkpoint"]

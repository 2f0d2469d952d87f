"""Loading checkpoints: HF model directories (safetensors; pickle only when asked), GGUF
files and reference names, into a float model plus tokenizer and its architecture adapter."""

from __future__ import annotations

import hashlib
import json
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.models.gguf_file import check_gguf
from compressor.models import assets
from compressor.models.adapters import Adapter, adapter_for_config
from compressor.safetensors_file import read_header, read_tensors
from compressor.util import human_bytes, sha256_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CompressorError(f"unknown dtype {name!r}", f"use one of: {', '.join(DTYPES)}") from None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    adapter: Adapter
    path: Path  # the directory or file it came from
    source_hash: str
    name: str  # what the user called it
    extra: dict = field(default_factory=dict)
    # The dtype the checkpoint stores its floating-point weights in (the model may compute in another).
    stored_dtype: torch.dtype = torch.float32
    # Set when the decoder blocks stay in the checkpoint until the engine reads them (models.lazy).
    lazy: object | None = None

    def source_sha256(self) -> str:
        """The checkpoint's hash; a lazy load computes it in a background thread while the engine runs."""
        if isinstance(self.source_hash, Future):
            self.source_hash = self.source_hash.result()
        return self.source_hash

    def __post_init__(self):
        check_tokenizer(self.model, self.tokenizer, self.name)


def check_tokenizer(model: nn.Module, tokenizer, name: str) -> None:
    """A tokenizer that makes ids the model has no embedding for belongs to another model."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if tokenizer is None or not isinstance(rows, int):
        return
    # The base vocabulary: added tokens beyond the embedding (a pad token, say) are common in
    # published checkpoints and harmless unless used, but base ids past it mean another model.
    tokens = getattr(tokenizer, "vocab_size", None)
    if not isinstance(tokens, int):
        try:
            tokens = len(tokenizer)
        except TypeError:
            return
    if tokens > rows:
        raise CompressorError(f"the tokenizer of {name} has {tokens} tokens but the model embeds only {rows}",
                              "put the model's own tokenizer files beside its weights")


def resolve_model_path(ref: str | Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """A model reference (reference name, HF directory or .gguf file) as an existing path."""
    ref_str = str(ref)
    if ref_str in assets.MODEL_ASSETS:
        return assets.fetch_model(ref_str, log)
    path = Path(ref_str).expanduser()
    if not path.exists():
        raise CompressorError(
            f"model path {ref_str} does not exist",
            f"pass an HF model directory, a .gguf file or a reference name ({', '.join(assets.MODEL_ASSETS)})",
        )
    if path.is_file() and path.suffix != ".gguf":
        raise CompressorError(f"{path} is a file but not a .gguf checkpoint",
                              "pass the model's directory (with config.json) or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CompressorError(f"{path} has no config.json", "pass a Hugging Face model directory")
    return path


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def pickle_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)


def check_checkpoint_files(path: Path, allow_pickle: bool) -> bool:
    """Validate a directory's weight files; returns True if it must be loaded from pickle."""
    safetensors = weight_files(path)
    if safetensors:
        for f in safetensors:
            read_header(f)
        return False
    pickles = pickle_files(path)
    if not pickles:
        raise CompressorError(f"{path} has no weight files (*.safetensors)", "point at a complete model directory")
    if not allow_pickle:
        raise CompressorError(
            f"{path} holds only pickle weights ({pickles[0].name}), which can run arbitrary code when loaded",
            "convert it to safetensors, or pass --allow-pickle if you trust its source",
        )
    return True


def read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raw = json.loads((path / "config.json").read_text())
        raise CompressorError(
            f"cannot read {path}/config.json (model_type {raw.get('model_type')!r}): {message}",
            "check the config, or use a supported architecture",
        ) from None


def source_hash(path: Path) -> str:
    """Hash of a checkpoint's config and weights, recorded in every artifact built from it."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else [path / "config.json", *weight_files(path), *pickle_files(path)]
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF checkpoint into an ordinary float model that save_pretrained accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CompressorError("loading .gguf files needs the gguf package", "pip install gguf") from None
    check_gguf(path)  # every count and range bounded by the file's size before the library reads it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CompressorError(f"cannot load {path}: {str(exc).splitlines()[0]}",
                              "check that the file is a complete GGUF of a supported architecture") from None
    # The weights are now plain floats; drop the marker that makes save_pretrained refuse them.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = dtype
    model.eval()
    return model, tokenizer


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        return None


def build_model(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """An HF model from a config and a complete float state dict, without random init."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    adapter_for_config(config).prepare(model)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if getattr(config, "tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CompressorError(
            f"checkpoint tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "the artifact is damaged or was written for another architecture",
        )
    model.eval()
    return model


def check_finite(model: nn.Module, ref: str) -> None:
    """A model with NaN or Inf weights evaluates (and trains) to NaN: refused, naming the tensor."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise CompressorError(f"{ref}: {name} has NaN or Inf in its weights",
                                  "the checkpoint is damaged: re-export or re-download it")


def load_model(
    ref: str | Path,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    log: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = lambda _: None,
    lazy: bool = False,
) -> LoadedModel:
    """Load an HF directory, a .gguf file or a reference name as a float model. With `lazy`, a
    safetensors checkpoint whose names match the model leaves its decoder blocks on disk (meta
    tensors in the model) for the engine to read one at a time."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(ref, log)
    if path.is_file():
        log(f"loading {path} ({human_bytes(path.stat().st_size)}, dequantizing GGUF)")
        model, tokenizer = load_gguf(path, dtype)
        adapter = adapter_for_config(model.config)
        adapter.prepare(model)
        return LoadedModel(model, tokenizer, adapter, path, source_hash(path), str(ref))
    config = read_config(path)
    adapter = adapter_for_config(config)
    from_pickle = check_checkpoint_files(path, allow_pickle)
    log(f"loading {path} ({human_bytes(source_bytes(path))} of weights)")
    if from_pickle:
        warn(f"loading pickle weights from {path} (--allow-pickle); torch's weights-only loader refuses code, "
             "but only load checkpoints whose source you trust")
    lazy_weights = None
    if lazy and not from_pickle:
        model, lazy_weights = _load_lazily(path, config, dtype)
    else:
        model = None if from_pickle else _load_safetensors_directly(path, config, dtype)
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=not from_pickle, trust_remote_code=False)
        except pickle.UnpicklingError as exc:
            raise CompressorError(f"refused to load {path}: its pickle holds objects or code that a weights-only "
                                  f"load does not allow ({str(exc).splitlines()[0][:120]})",
                                  "do not use this checkpoint; ask its source for safetensors weights") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise CompressorError(f"cannot load {path}: {str(exc).splitlines()[0]}",
                                  "check that the checkpoint is complete and matches its config") from None
        adapter.prepare(model)
    model.eval()
    log(f"hashing {human_bytes(source_bytes(path))} of weights (recorded in the artifact's manifest)")
    digest = _hashing(path) if lazy_weights is not None else source_hash(path)
    return LoadedModel(model, load_tokenizer(path), adapter, path, digest, str(ref),
                       stored_dtype=stored_float_dtype(weight_files(path)) or dtype, lazy=lazy_weights)


def _hashing(path: Path) -> Future:
    """source_hash in a background thread (hashlib releases the GIL on large reads)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="source-hash")
    future = pool.submit(source_hash, path)
    pool.shutdown(wait=False)
    return future


def quick_identity(path: Path) -> str:
    """A cheap identity of a checkpoint (names, sizes, modification times and safetensors headers
    of its files): what a resumed run checks against, without reading every weight."""
    from compressor.safetensors_file import header_bytes

    h = hashlib.sha256()
    files = [path] if path.is_file() else [path / "config.json", *weight_files(path), *pickle_files(path)]
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if f.suffix == ".safetensors":
            h.update(header_bytes(f))
    return h.hexdigest()


def source_bytes(path: Path) -> int:
    """Bytes of a checkpoint's weights on disk; a GGUF counts as its dequantized float32 size
    (about eight times a 4-bit file), which is what the commands hold and write."""
    if path.is_file():
        return 8 * path.stat().st_size
    return sum(f.stat().st_size for f in [*weight_files(path), *pickle_files(path)])


def stored_float_dtype(files: list[Path]) -> torch.dtype | None:
    """The floating-point dtype holding most of the bytes of a set of safetensors files."""
    from compressor.safetensors_file import torch_dtype

    totals: dict[str, int] = {}
    for f in files:
        entries, _ = read_header(f)
        for e in entries.values():
            if e.dtype in ("F16", "BF16", "F32", "F64"):
                totals[e.dtype] = totals.get(e.dtype, 0) + e.end - e.start
    return torch_dtype(max(totals, key=totals.get)) if totals else None


def _load_safetensors_directly(path: Path, config, dtype: torch.dtype) -> nn.Module | None:
    """Read the weights with plain reads into the model (resident memory = the weights once).

    Returns None when the checkpoint's names need transformers' own renaming on load, so the
    caller falls back to from_pretrained.
    """
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(read_tensors(f))
    try:
        return build_model(config, state, dtype)
    except CompressorError:
        return None


def _load_lazily(path: Path, config, dtype: torch.dtype):
    """(model, LazyWeights) with everything but the decoder blocks read now; (None, None) when
    the checkpoint's names or shapes differ from the model's (transformers must rename them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compressor.models.lazy import LazyWeights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    adapter = adapter_for_config(config)
    adapter.prepare(model)
    weights = LazyWeights(weight_files(path), dtype)
    tied = set(adapter.tied_weight_names(model))
    if getattr(config, "tie_word_embeddings", False):  # meta tensors do not show the aliasing yet
        tied.add(f"{adapter.head_name}.weight")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    stored = {k: e.shape for k, (_, e) in weights.entries.items()}
    if any(stored.get(k) != shape for k, shape in expected.items()) or set(stored) - set(expected) - tied:
        return None, None
    prefixes = [adapter.block_prefix(model, i) for i in range(len(adapter.blocks(model)))]
    outside = [k for k in expected if not any(k.startswith(p) for p in prefixes)]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.read(outside).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    return model, weights

"""Text data for calibration and evaluation: local files or reference names, tokenized.

Sources: .txt, .jsonl, .parquet files, or a `datasets` dataset saved with save_to_disk.
Reference names ('wiki', 'wiki:calib', 'wiki:eval') resolve to the fetched reference text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compressor.errors import CompressorError
from compressor.models import assets
from compressor.util import sha256_file

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def resolve_data(ref: str | Path, split: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """A data reference as a path: a reference text name (split 'calib' or 'eval') or a local path."""
    named = assets.resolve_text(str(ref), split, log)
    if named is not None:
        return named
    path = Path(ref).expanduser()
    if not path.exists():
        raise CompressorError(
            f"data path {ref} does not exist",
            f"pass a .txt/.jsonl/.parquet file, a dataset saved with save_to_disk, or {', '.join(assets.TEXT_ASSETS)}",
        )
    if path.is_file() and path.suffix not in TEXT_SUFFIXES:
        raise CompressorError(f"unsupported data file {path.name}", f"use one of {', '.join(TEXT_SUFFIXES)}")
    return path


def _field(record: dict, text_field: str, where: str):
    if text_field in record:
        return record[text_field]
    if "messages" in record:
        return record["messages"]
    raise CompressorError(f"{where} has no field {text_field!r} (fields: {', '.join(record)})",
                          "pass --text-field with the name of the text column")


def read_documents(path: Path, text_field: str = "text") -> list:
    """Documents of a data source: strings, or chat message lists where a record has 'messages'."""
    if path.is_dir():
        return _read_saved_dataset(path, text_field)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise CompressorError(f"{path}:{lineno} is not valid JSON", "fix or remove that line") from None
                if not isinstance(record, dict):
                    raise CompressorError(f"{path}:{lineno} is not a JSON object", "each line must be an object")
                docs.append(_field(record, text_field, f"{path}:{lineno}"))
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise CompressorError(f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)})",
                                  "pass --text-field with the name of the text column")
        return [t for t in table.column(text_field).to_pylist() if t]
    raise CompressorError(f"unsupported data file {path.name}", f"use one of {', '.join(TEXT_SUFFIXES)}")


def _read_saved_dataset(path: Path, text_field: str) -> list:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise CompressorError("reading a saved dataset needs the datasets package", "pip install datasets") from None
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise CompressorError(f"{path} is not a dataset saved with save_to_disk ({exc})",
                              "pass a .txt/.jsonl/.parquet file or a save_to_disk directory") from None
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise CompressorError(f"{path} has no column {text_field!r} (columns: {', '.join(ds.column_names)})",
                              "pass --text-field with the name of the text column")
    return [t for t in ds[text_field] if t]


def render(docs: list, tokenizer, chat_template: bool) -> str:
    """Documents as one text; with chat_template each becomes a chat rendered by the tokenizer."""
    if not chat_template:
        return "\n\n".join(d if isinstance(d, str) else _flatten_messages(d) for d in docs)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CompressorError("the tokenizer has no chat template", "drop --chat-template")
    rendered = []
    for d in docs:
        messages = d if isinstance(d, list) else [{"role": "user", "content": d}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "".join(rendered)


def _flatten_messages(messages) -> str:
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages)


def token_stream(path: Path, tokenizer, text_field: str = "text", chat_template: bool = False) -> torch.Tensor:
    """Every token of a data source, rendered as one text (documents joined by blank lines).

    Tokenizing a few MB of text as one string is single-threaded and takes seconds, so the stream
    is kept in the compressor cache (`tokens/`), keyed by the tokenizer, the data's bytes and these
    settings: a later run with the same inputs reads it back (checked against its own hash)."""
    key = _stream_key(path, tokenizer, text_field, chat_template)
    cached = _cached_stream(key)
    if cached is not None:
        return cached
    docs = read_documents(path, text_field)
    text = render(docs, tokenizer, chat_template)
    if not text.strip():
        raise CompressorError(f"{path} contains no text", "pass a data source with at least some documents")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                       dtype=torch.long)
    if key is not None:
        _store_stream(key, ids)
    return ids


STREAM_CACHE_VERSION = 1


def _stream_key(path: Path, tokenizer, text_field: str, chat_template: bool) -> str | None:
    """What a token stream depends on, hashed; None where it cannot be pinned down cheaply (a
    tokenizer without a serializable fast backend, a saved dataset directory)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not Path(path).is_file():
        return None
    try:
        serialized = backend.to_str()
    except Exception:  # a backend that cannot say what it is: tokenize every time
        return None
    h = hashlib.sha256()
    for part in (str(STREAM_CACHE_VERSION), type(tokenizer).__name__, serialized,
                 str(getattr(tokenizer, "split_special_tokens", False)), text_field, str(chat_template),
                 str(getattr(tokenizer, "chat_template", None)) if chat_template else "", sha256_file(Path(path))):
        h.update(hashlib.sha256(part.encode()).digest())
    return h.hexdigest()


def _stream_file(key: str) -> Path:
    return assets.cache_dir() / "tokens" / f"{key}.safetensors"


def _cached_stream(key: str | None) -> torch.Tensor | None:
    """The cached stream of `key`, or None if absent or not what was stored (recomputed then)."""
    if key is None or not _stream_file(key).is_file():
        return None
    from compressor.safetensors_file import read_header, read_tensors

    path = _stream_file(key)
    try:
        _, metadata = read_header(path)
        ids = read_tensors(path).get("ids")
    except (CompressorError, OSError):
        return None
    if ids is None or ids.dim() != 1 or metadata.get("key") != key or metadata.get("sha256") != tensor_hash(ids):
        return None
    return ids.long()


def _store_stream(key: str, ids: torch.Tensor) -> None:
    """Written atomically; a cache that cannot be written (read-only, full) only costs the next run time."""
    from compressor.safetensors_file import write_tensors

    path = _stream_file(key)
    stored = ids.to(torch.int32) if ids.numel() and int(ids.max()) < 2**31 else ids
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(tmp, {"ids": stored}, {"key": key, "sha256": tensor_hash(stored)})
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def tensor_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class TokenSet:
    """Token windows of fixed length, with what they came from."""

    input_ids: torch.Tensor  # [samples, seq_len] int64
    source: str
    sha256: str

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        return {"source": self.source, "samples": self.samples, "seq_len": self.seq_len, "sha256": self.sha256}


def _all_windows(ref: str | Path, tokenizer, split: str, count: int, length: int, what: str,
                 flags: tuple[str, str], text_field: str, chat_template: bool,
                 log: Callable[[str], None]) -> torch.Tensor:
    """Every non-overlapping window of `length` tokens of the data; errors name the shortfall."""
    count_flag, length_flag = flags
    if count < 1:
        raise CompressorError(f"{what} needs {count_flag} >= 1 (got {count})", f"raise {count_flag}")
    if length < 2:
        raise CompressorError(f"{what} needs {length_flag} >= 2 (got {length})", f"raise {length_flag}")
    if tokenizer is None:
        raise CompressorError(f"{what} needs a tokenizer but the model has none",
                              "add the tokenizer files to the model directory")
    # Several sources, comma-separated ('wiki,austen:train'): their token streams one after another.
    refs = [r.strip() for r in str(ref).split(",") if r.strip()] if "," in str(ref) else [ref]
    paths = [resolve_data(r, split, log) for r in refs]
    streams = [token_stream(path, tokenizer, text_field, chat_template) for path in paths]
    stream = torch.cat(streams) if len(streams) > 1 else streams[0]
    available = stream.numel() // length
    if available < count:
        where = ", ".join(str(p) for p in paths)
        raise CompressorError(
            f"{where} yields {stream.numel()} tokens, {available} windows of {length}; {what} needs {count} "
            f"({count * length} tokens)", f"add text (e.g. --calib wiki,austen:train) or lower {count_flag}/{length_flag}")
    return stream[: available * length].view(available, length)


def calibration_set(
    ref: str | Path, tokenizer, samples: int = 128, seq_len: int = 512, seed: int = 0,
    text_field: str = "text", chat_template: bool = False, log: Callable[[str], None] = lambda _: None,
) -> TokenSet:
    """`samples` windows of `seq_len` tokens drawn without overlap from the data, chosen by `seed`."""
    windows = _all_windows(ref, tokenizer, "calib", samples, seq_len, "calibration", ("--samples", "--seq-len"),
                           text_field, chat_template, log)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=generator)[:samples].sort().values
    ids = windows[chosen].clone()
    return TokenSet(ids, str(ref), tensor_hash(ids))


def calibration_holdout(
    ref: str | Path, tokenizer, samples: int, seq_len: int, seed: int, count: int, text_field: str = "text",
    chat_template: bool = False, log: Callable[[str], None] = lambda _: None,
) -> TokenSet:
    """`count` windows of the calibration data that `calibration_set` with the same settings does not
    choose: text of the calibration split that calibration never saw, to measure a build on without
    touching the evaluation split."""
    windows = _all_windows(ref, tokenizer, "calib", samples + count, seq_len, "calibration with a held-out part",
                           ("--samples", "--seq-len"), text_field, chat_template, log)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=generator)[samples:samples + count].sort().values
    ids = windows[chosen].clone()
    return TokenSet(ids, f"{ref} (held out from calibration)", tensor_hash(ids))


def evaluation_set(
    ref: str | Path, tokenizer, windows: int = 64, window_len: int = 512, text_field: str = "text",
    log: Callable[[str], None] = lambda _: None,
) -> TokenSet:
    """The first `windows` non-overlapping windows of the held-out text (no BOS inserted)."""
    ids = _all_windows(ref, tokenizer, "eval", windows, window_len, "evaluation", ("--windows", "--window-len"),
                       text_field, False, log)[:windows].clone()
    return TokenSet(ids, str(ref), tensor_hash(ids))

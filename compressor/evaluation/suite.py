"""The evaluation behind a comparison report: every candidate against one base, cached.

Each model is evaluated on the perplexity protocol over each held-out text (non-overlapping
windows, no BOS), with per-token KL to the base on the same tokens (the base's tokenizer cuts
the windows), optional lm-eval tasks, and per-layer maps: stored bits per weight of every
block linear, relative weight error against the base's linear of the same name and shape, and
the fraction of the base linear's weights kept (sliced/pruned models).

Results are cached as JSON under `<cache>/evaluations/`, keyed by the candidate's content hash,
the base's and the settings, so a report over ten candidates evaluates only the new ones. A
candidate that cannot be identified or evaluated (damaged, unreadable) becomes an error row;
the others are still evaluated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compressor.calib.data import evaluation_set
from compressor.errors import CompressorError
from compressor.evaluation.perplexity import evaluate_models
from compressor.formats.layer_stats import block_linear_bits, split_block_name
from compressor.models import assets
from compressor.models.loading import LoadedModel, resolve_model_path, source_hash
from compressor.formats.universal import describe, identify, open_model
from compressor.progress import Progress
from compressor.util import write_atomic

CACHE_VERSION = 1


@dataclass(frozen=True)
class SuiteSettings:
    texts: tuple[str, ...] = ("wiki", "austen")
    windows: int = 64
    window_len: int = 512
    tasks: tuple[str, ...] = ()
    limit: float | None = None
    batch_size: int = 4
    device: str = "cpu"

    def key(self) -> dict:
        """What changes the numbers (not the batch size)."""
        d = asdict(self)
        d.pop("batch_size")
        d["device"] = torch.device(self.device).type
        return d


class EvalCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else assets.cache_dir() / "evaluations"

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a damaged entry is re-evaluated

    def put(self, key: str, value: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / f"{key}.json", json.dumps(value, indent=1, sort_keys=True).encode())


@dataclass
class Candidate:
    ref: str
    identity: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    result: dict | None = None
    error: str | None = None
    flags: list[str] = field(default_factory=list)
    cached: bool = False


def _lineage(info: dict) -> str | None:
    """The content hash of the checkpoint an artifact was built from, where its manifest says."""
    source = info.get("source") or {}
    return source.get("sha256") or source.get("hash")


@functools.lru_cache(maxsize=64)
def _architecture(path: str) -> tuple:
    from compressor.formats.artifact import read_config

    p = Path(path)
    if p.is_file():  # GGUF: the config transformers derives from its metadata
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(p.parent, gguf_file=p.name).to_dict()
    else:
        c = read_config(p)
    c = c.get("text_config", c) if "vocab_size" not in c else c
    return (c.get("base_model_type") or c.get("model_type"), c.get("vocab_size"), c.get("num_hidden_layers"))


def check_bases(base: Candidate, candidates: list[Candidate], allow_mixed: bool) -> None:
    """Each candidate must descend from the base: by the source hashes in manifests (through
    other candidates, e.g. a packed copy of a quantized artifact), or, where no manifest
    records it, by architecture (model type, vocabulary, depth)."""
    known = {base.identity["sha256"], _content_hash(base)}
    pending = [c for c in candidates if c.error is None]
    hashed: set[int] = set()
    while True:  # close over chains (base -> quantized -> packed), hashing contents only when needed
        for c in pending:
            if not c.identity.get("lineage_ok") and _lineage(c.info) in known:
                c.identity["lineage_ok"] = True
                known.add(c.identity["sha256"])
        matched = [c for c in pending if c.identity.get("lineage_ok") and id(c) not in hashed]
        if all(c.identity.get("lineage_ok") for c in pending) or not matched:
            break
        for c in matched:
            hashed.add(id(c))
            known.add(_content_hash(c))
    for c in pending:
        if c.identity.get("lineage_ok"):
            continue
        lineage = _lineage(c.info)
        if lineage is None and _architecture(c.identity["path"]) == _architecture(base.identity["path"]):
            c.flags.append("lineage not recorded: same architecture as the base")
            continue
        why = (f"built from {lineage[:12]}, not from the base" if lineage
               else f"architecture {_architecture(c.identity['path'])} differs from the base's")
        if not allow_mixed:
            raise CompressorError(f"{c.ref} has a different base model ({why})",
                                  "compare artifacts of one base model, or pass --allow-mixed-base")
        c.flags.append(f"different base model: {why}")


def _content_hash(c: Candidate) -> str:
    """The source hash our artifacts record for a checkpoint they are built from (for a plain
    checkpoint, the identity hash itself)."""
    if c.identity.get("kind") in ("hf", "gguf", "compressed-tensors"):
        return c.identity["sha256"]
    if "content" not in c.identity:
        c.identity["content"] = source_hash(Path(c.identity["path"]))
    return c.identity["content"]


def _layer_maps(path: str, model: torch.nn.Module, base: torch.nn.Module | None) -> dict:
    maps: dict[str, dict] = {}
    bits = block_linear_bits(Path(path)) if Path(path).is_dir() else {}
    if bits:
        maps["bits per weight"] = bits
    if base is None or model is base:
        return maps
    base_linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    error: dict[str, dict[int, float]] = {}
    kept: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            where = split_block_name(name)
            ref = base_linears.get(name)
            if where is None or ref is None or not isinstance(module, torch.nn.Linear):
                continue
            index, linear = where
            w, wb = module.weight.float(), ref.weight.float()
            if w.shape == wb.shape:
                error.setdefault(linear, {})[index] = float((w - wb).norm() / wb.norm().clamp_min(1e-30))
            kept.setdefault(linear, {})[index] = w.numel() / wb.numel()
    for title, values in (("relative weight error", error), ("fraction of weights kept", kept)):
        if values and not (title.startswith("fraction") and all(v == 1 for per in values.values() for v in per.values())):
            if title.startswith("relative") and all(v == 0 for per in values.values() for v in per.values()):
                continue
            blocks = 1 + max(i for per in values.values() for i in per)
            maps[title] = {k: [per.get(i) for i in range(blocks)] for k, per in sorted(values.items())}
    return maps


def _evaluate(c: Candidate, loaded: LoadedModel, base: LoadedModel, token_sets: dict, settings: SuiteSettings,
              progress: Progress) -> dict:
    started = time.perf_counter()
    is_base = loaded is base
    loaded.model.to(settings.device)
    texts = {}
    for text, tokens in token_sets.items():
        progress.log(f"{c.ref}: perplexity on {text}")
        r = evaluate_models({"m": loaded.model}, tokens, None if is_base else base.model, settings.batch_size,
                            settings.device, progress)
        row = r["m"]
        texts[text] = {"ppl": row["ppl"], "nll": row["nll"], "tokens": row["tokens"],
                       "kl": 0.0 if is_base else row["kl"], "data": tokens.describe()}
    tasks = {}
    if settings.tasks:
        from compressor.evaluation.lm_eval_bridge import run_tasks

        tasks = run_tasks(c.identity["path"], list(settings.tasks), limit=settings.limit, device=settings.device,
                          batch_size=1, progress=progress)
    return {"texts": texts, "lm_eval": tasks, "layers": _layer_maps(c.identity["path"], loaded.model,
                                                                      None if is_base else base.model),
            "eval_s": time.perf_counter() - started, "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def evaluate_all(refs: list[str], base_ref: str, settings: SuiteSettings, cache: EvalCache | None = None,
                 allow_mixed_base: bool = False, progress: Progress | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[Candidate, list[Candidate]]:
    """The base and every candidate, evaluated or read from the cache; errors kept per candidate."""
    progress = progress or Progress()
    cache = cache or EvalCache()
    base = Candidate(str(base_ref))
    base.identity = identify(base_ref, progress.log)
    base.info = describe(base_ref)
    candidates = []
    for ref in refs:
        c = Candidate(str(ref))
        try:
            resolve_model_path(ref)
            c.identity = identify(ref)
            c.info = describe(ref)
        except CompressorError as exc:
            c.error = exc.one_line()
        candidates.append(c)
    check_bases(base, candidates, allow_mixed_base)
    settings_key = settings.key()
    todo = []
    for c in [base, *candidates]:
        if c.error is not None:
            continue
        c.identity["cache_key"] = EvalCache.key(c.identity["sha256"], base.identity["sha256"], settings_key)
        c.result = cache.get(c.identity["cache_key"])
        c.cached = c.result is not None
        if c.result is None:
            todo.append(c)
    if todo:
        base_loaded = open_model(base_ref, device=settings.device, verify=False, log=progress.log)
        tokenizer = base_loaded.tokenizer
        token_sets = {t: evaluation_set(t, tokenizer, settings.windows, settings.window_len, log=progress.log)
                      for t in settings.texts}
        for c in todo:
            try:
                loaded = base_loaded if c is base else open_model(c.ref, device=settings.device, verify=False,
                                                                  log=progress.log)  # identify() verified it
                if loaded.model.config.vocab_size != base_loaded.model.config.vocab_size:
                    raise CompressorError(f"vocabulary {loaded.model.config.vocab_size} differs from the base's "
                                          f"{base_loaded.model.config.vocab_size}", "KL needs the base's tokenizer")
                c.result = _evaluate(c, loaded, base_loaded, token_sets, settings, progress)
                cache.put(c.identity["cache_key"], c.result)
            except (CompressorError, OSError, RuntimeError, ValueError) as exc:
                if c is base:
                    raise
                c.error = exc.one_line() if isinstance(exc, CompressorError) else \
                    f"cannot evaluate: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            loaded = None  # noqa: F841  (one candidate in memory at a time)
    return base, candidates

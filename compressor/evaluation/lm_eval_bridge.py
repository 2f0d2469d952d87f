"""compressor as an lm-eval model, and lm-eval run in-process on any artifact.

`CompressorLM` is registered in lm-eval's model registry as `compressor`: it opens the model
with our universal loader (every artifact kind, packed ones from their packed weights) and
hands it to lm-eval's own HF implementation, so requests are tokenized, batched and scored
exactly as `--model hf` does. BOS handling is made explicit: unless `add_bos_token` is given,
it is resolved from the tokenizer (does its encoding start with BOS?) and recorded with the
results, together with whether a chat template was applied and its hash.

Every run is offline: the hub is never contacted (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so a
task whose data is not available locally is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Iterator

import torch
from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from compressor.errors import CompressorError
from compressor.evaluation import local_tasks
from compressor.models.loading import parse_dtype
from compressor.formats.universal import open_model
from compressor.progress import Progress

MODEL_NAME = "compressor"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _flag(value: Any, name: str = "add_bos_token") -> bool | None:
    """lm-eval passes model_args from the command line as strings."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    if text in ("auto", "none", ""):
        return None
    raise CompressorError(f"{name} must be true, false or auto, not {value!r}", f"e.g. {name}=true")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


class _ProgressHook(CacheHook):
    """lm-eval's per-request cache hook, also advancing our progress bar."""

    def __init__(self, inner: CacheHook, progress: Progress):
        self.inner, self.progress = inner, progress
        self.dbdict = inner.dbdict

    def add_partial(self, attr: str, req, res) -> None:
        self.inner.add_partial(attr, req, res)
        if attr in ("loglikelihood", "generate_until"):
            self.progress.advance()


@register_model(MODEL_NAME)
class CompressorLM(HFLM):
    """`lm_eval --model compressor --model_args pretrained=PATH[,device=cpu][,dtype=float32]
    [,add_bos_token=auto|true|false][,batch_size=N]`; PATH is anything `compress eval` takes."""

    def __init__(self, pretrained: str, device: str | None = "cpu", dtype: str | torch.dtype = "float32",
                 add_bos_token: Any = None, batch_size: int | str = 1, max_length: int | None = None,
                 verify: Any = True, progress: Progress | None = None, **kwargs):
        if not isinstance(pretrained, str):
            raise CompressorError("the compressor lm-eval model takes a path or reference name",
                                  "pass --model_args pretrained=PATH")
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda;
            logging.getLogger(__name__).warning("CUDA is not available; evaluating on cpu")  # hf falls back too
            device = "cpu"
        dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        loaded = open_model(pretrained, dtype=dtype, device=device, verify=_flag(verify, "verify") is not False)
        if loaded.tokenizer is None:
            raise CompressorError(f"{pretrained} has no tokenizer", "lm-eval tasks need the model's tokenizer files")
        loaded.model.to(device)
        bos = _flag(add_bos_token)
        self.bos_resolved_from = "tokenizer" if bos is None else "argument"
        if bos is None:
            bos = tokenizer_adds_bos(loaded.tokenizer)
        self.loaded = loaded
        self._progress = progress
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, device=device,
                         batch_size=int(batch_size), add_bos_token=bos, max_length=max_length, **kwargs)
        self.pretrained_ref = pretrained

    # -- progress: one step per scored request (lm-eval's own tqdm bars stay off when we draw ours)

    def set_cache_hook(self, cache_hook: CacheHook) -> None:
        super().set_cache_hook(_ProgressHook(cache_hook, self._progress) if self._progress else cache_hook)

    @contextlib.contextmanager
    def _task(self, description: str, total: int) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        if not isinstance(self.cache_hook, _ProgressHook):
            self.set_cache_hook(self.cache_hook)
        with self._progress.task(description, total):
            yield

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._task("lm-eval loglikelihood requests", len(requests)):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self._progress is not None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        windows = sum(-(-max(len(self.tok_encode(r.args[0])), 1) // self.max_length) for r in requests)
        try:
            with self._task("lm-eval rolling windows", windows):
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self._progress is not None)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self._progress is not None,
                                            override_bs=override_bs)
        if self._progress is not None and getattr(self, "_rolling", False):
            self._progress.advance(len(requests))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._task("lm-eval generation requests", len(requests)):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self._progress is not None)

    def settings(self, apply_chat_template: bool) -> dict:
        """How prompts were encoded, recorded with every result."""
        template = getattr(self.tokenizer, "chat_template", None) if apply_chat_template else None
        return {
            "add_bos_token": bool(self.add_bos_token), "bos_from": self.bos_resolved_from,
            "bos_token": self.tokenizer.bos_token, "prefix_token_id": self.prefix_token_id,
            "chat_template": bool(apply_chat_template),
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
            "max_length": self.max_length, "batch_size": self.batch_size, "dtype": str(self.loaded.model.dtype),
            "kind": self.loaded.extra.get("kind"),
        }


@contextlib.contextmanager
def offline(quiet_tqdm: bool = False) -> Iterator[None]:
    """No hub access while lm-eval runs (and no tqdm bars where ours are drawn)."""
    env = OFFLINE_ENV | ({"TQDM_DISABLE": "1"} if quiet_tqdm else {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(names: list[str], log=lambda _: None):
    """lm-eval's TaskManager with our local tasks (those requested are built first); lm-eval's
    own catalogue (thousands of YAML files, seconds to index) only when a task needs it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_tasks.prepare(names, log)),
                       include_defaults=any(n not in local_tasks.LOCAL_TASKS for n in names))


def check_tasks(names: list[str], manager) -> None:
    """Every task exists and its data loads offline; otherwise a one-line error naming it."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise CompressorError(f"unknown lm-eval task {name!r}",
                                  f"local tasks: {', '.join(local_tasks.LOCAL_TASKS)}; see `lm_eval ls tasks`")
        try:
            manager.load([name])
        except Exception as exc:  # datasets raises many types when offline data is missing
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CompressorError(f"lm-eval task {name!r} has no data available offline ({type(exc).__name__}: "
                                  f"{first})", "use a local task (" + ", ".join(local_tasks.LOCAL_TASKS)
                                  + ") or put the task's dataset in the local datasets cache") from None


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_tasks(model: str, tasks: list[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
              device: str = "cpu", batch_size: int = 1, add_bos_token: bool | None = None,
              apply_chat_template: bool = False, bootstrap_iters: int = 1000, seed: int = 0, verify: bool = True,
              progress: Progress | None = None) -> dict:
    """lm-eval on any artifact, in-process: metrics with lm-eval's stderr, and the settings."""
    import lm_eval

    progress = progress or Progress()
    if not tasks:
        raise CompressorError("no lm-eval tasks given", "pass --tasks T1,T2")
    if limit is not None and limit <= 0:
        raise CompressorError(f"--limit must be positive (got {limit})", "e.g. --limit 100")
    _quiet_lm_eval()
    with offline(quiet_tqdm=True):
        manager = task_manager(tasks, progress.log)
        check_tasks(tasks, manager)
        lm = CompressorLM(model, device=device, add_bos_token=add_bos_token, batch_size=batch_size,
                          verify=verify, progress=progress)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return summarize(out, tasks) | {"settings": lm.settings(apply_chat_template) | {
        "limit": limit, "num_fewshot": num_fewshot, "bootstrap_iters": bootstrap_iters,
        "lm_eval_version": lm_eval.__version__}}


def summarize(out: dict, tasks: list[str]) -> dict:
    """lm-eval's results as {task: {metric: value, metric_stderr: value, samples: n}}."""
    results = {}
    for task in tasks:
        row = out["results"].get(task, {})
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            if "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            metrics[metric] = None if value == "N/A" else value
        n = out.get("n-samples", {}).get(task, {})
        metrics["samples"] = n.get("effective", n.get("original"))
        data = local_tasks.describe(task)
        if data:
            metrics["data"] = data
        results[task] = metrics
    return {"tasks": results}

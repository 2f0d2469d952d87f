"""lm-eval tasks built from text we can get offline, written as ordinary lm-eval task YAML.

- `compressor_wiki_cloze`: multiple-choice next sentence. Context: the opening sentences of a
  held-out Wikipedia article; choices: its true next sentence and three sentences of similar
  length from other held-out articles (fixed seed). Metrics acc / acc_norm.
- `compressor_wiki_ppl`: rolling log-likelihood over every held-out Wikipedia article.
- `compressor_austen_ppl`: rolling log-likelihood over every chapter of Jane Austen's novels.

The data (JSONL) and YAML are written under the asset cache, `<cache>/lm_eval_tasks/`, which is
passed to lm-eval's TaskManager as an include path; the YAML names its data file by absolute
path, built from the cache directory, never from anything read from a file.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from pathlib import Path
from typing import Callable

import yaml

from compressor.models import assets
from compressor.outputs import atomic_dir
from compressor.util import sha256_file

VERSION = 1
CLOZE_CHOICES = 4
CLOZE_MAX_DOCS = 1000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")

PPL_METRICS = [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]


def _documents(text: str) -> list[dict]:
    path = assets.resolve_text(text, "eval")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if len(s.strip()) > 20]


def cloze_docs(documents: list[dict], seed: int = 0, max_docs: int = CLOZE_MAX_DOCS,
               context_sentences: int = 3) -> list[dict]:
    """Next-sentence multiple choice from articles: the true continuation against sentences
    of similar length (within 30%, else the nearest) from other articles."""
    split = [_sentences(d["text"]) for d in documents]
    pool = sorted(((len(s), i, s) for i, sents in enumerate(split) for s in sents[1:]), key=lambda x: x[0])
    lengths = [p[0] for p in pool]
    out = []
    for index, sents in enumerate(split):
        if len(sents) < 2 or len(out) >= max_docs:
            continue
        k = min(context_sentences, len(sents) - 1)
        gold = sents[k]
        rng = random.Random(seed * 1_000_003 + index)
        lo, hi = bisect.bisect_left(lengths, 0.7 * len(gold)), bisect.bisect_right(lengths, 1.3 * len(gold))
        candidates = [p for p in pool[lo:hi] if p[1] != index and p[2] != gold]
        if len(candidates) < CLOZE_CHOICES - 1:
            continue
        distractors = [p[2] for p in rng.sample(candidates, CLOZE_CHOICES - 1)]
        label = rng.randrange(CLOZE_CHOICES)
        choices = distractors[:label] + [gold] + distractors[label:]
        out.append({"id": len(out), "title": documents[index].get("title", ""), "context": " ".join(sents[:k]),
                    "choices": choices, "label": label})
    return out


def ppl_docs(documents: list[dict]) -> list[dict]:
    return [{"title": d.get("title", ""), "text": d["text"]} for d in documents if d["text"].strip()]


def _cloze_yaml(name: str, data: Path) -> dict:
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": VERSION},
    }


def _ppl_yaml(name: str, data: Path) -> dict:
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood_rolling",
        "doc_to_text": "", "doc_to_target": "{{text}}", "metric_list": PPL_METRICS,
        "metadata": {"version": VERSION},
    }


# name -> (text asset, docs builder, yaml builder)
LOCAL_TASKS: dict[str, tuple[str, Callable[[list[dict]], list[dict]], Callable[[str, Path], dict]]] = {
    "compressor_wiki_cloze": ("wiki", cloze_docs, _cloze_yaml),
    "compressor_wiki_ppl": ("wiki", ppl_docs, _ppl_yaml),
    "compressor_austen_ppl": ("austen", ppl_docs, _ppl_yaml),
}


def tasks_dir() -> Path:
    return assets.cache_dir() / "lm_eval_tasks"


def prepare(names: list[str], log: Callable[[str], None] = lambda _: None) -> Path:
    """Write the data and YAML of the local tasks among `names` (idempotent); returns the
    include path for lm-eval's TaskManager."""
    root = tasks_dir()
    for name in names:
        if name not in LOCAL_TASKS or (root / name / f"{name}.yaml").is_file():
            continue
        text, build_docs, build_yaml = LOCAL_TASKS[name]
        log(f"building lm-eval task {name} from {text}")
        docs = build_docs(_documents(text))
        with atomic_dir(root / name) as tmp:
            data = tmp / "test.jsonl"
            data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
            config = build_yaml(name, root / name / "test.jsonl")
            config["metadata"]["data_sha256"] = sha256_file(data)
            config["metadata"]["documents"] = len(docs)
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    root.mkdir(parents=True, exist_ok=True)
    return root


def describe(name: str) -> dict | None:
    """The data hash and size a prepared local task records, for provenance."""
    path = tasks_dir() / name / f"{name}.yaml"
    if name not in LOCAL_TASKS or not path.is_file():
        return None
    meta = yaml.safe_load(path.read_text()).get("metadata", {})
    return {"text": LOCAL_TASKS[name][0], "documents": meta.get("documents"), "data_sha256": meta.get("data_sha256")}

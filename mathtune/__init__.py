"""mathtune: fine-tune language models on math with LoRA, verify the gain, export back to GGUF.

The pipeline, one module each: config -> data -> model -> lora -> train (-> evaluate -> export).
"""

__version__ = "0.1.0"

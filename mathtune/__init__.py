"""mathtune: fine-tune language models on math with LoRA, verify the gain, export back to GGUF.

The pipeline, one module each: config -> data -> model -> lora -> train (-> evaluate -> export).
"""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU matrix products in bf16) keeps a compiled kernel per matrix shape, each
# holding its own repacked copy of the weight, 1,024 of them by default. Packed training batches
# change length every step, so most of those are stale: on the default run (2-core Intel Xeon with
# AMX) they grew the process by ~40 MB a step. 64 holds the shapes of a step (16 does not: kernels
# were compiled again within each step, 40% slower): 24 steps peaked at 3.16 GB against 3.58 GB,
# no slower. Read by oneDNN at its first product, so set here, before any; a value already set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

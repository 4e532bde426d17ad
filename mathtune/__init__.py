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
# ideep, the oneDNN wrapper inside PyTorch that runs those products, keeps a second cache of kernels
# per shape (LRU_CACHE_CAPACITY, 1,024 by default): on the default run the heap held in use grew
# ~6.6 MB a step until ~40 steps. With 64 the default run peaked at 2.33-2.36 GB against 2.76-2.79 GB
# (three runs each, 2-core Intel Xeon with AMX), as fast (training 125-131 s against 115-135 s) and
# with the same answers. Read at ideep's first product too.
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

"""Peak memory and time of converting a llama-shaped GGUF: streaming (mathtune) against transformers' loader.

    .venv/bin/python benchmarks/convert_memory.py --shape 2.3b            # both paths, side by side
    .venv/bin/python benchmarks/convert_memory.py --shape 7b --after-only # Mistral-7B shape: ~8 GB file, ~15 GB out
    .venv/bin/python benchmarks/convert_memory.py --source FILE.gguf      # a file of your own (kept)

Writes a Q8_0 GGUF of the shape (SmolLM2's real tokenizer and chat template, random weights) into
--dir, converts it in a child process per path, and prints each child's peak anonymous memory
(RssAnon, sampled from /proc: what the kernel cannot drop), peak resident memory (VmHWM: also counts
the memory-mapped file's pages) and time. "before" is transformers' `gguf_file=` loader, the path
mathtune used until the streaming conversion (it holds every dequantized tensor: ~15-20 GB at 7B,
hence --after-only there). Every file it writes is deleted at the end. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gguf_files import peak_rss_anon, scaled_llama_gguf  # noqa: E402

# layers, hidden, FFN, heads, KV heads, tied embeddings
SHAPES = {"small": (12, 1024, 4096, 16, 4, True), "2.3b": (32, 2560, 6912, 20, 4, True),
          "7b": (32, 4096, 14336, 32, 8, False)}
CHILD = """
import sys
from pathlib import Path
import mathtune.model.convert as c
if sys.argv[3] == "before":
    c.STREAMING_ARCHS = ()
c.convert(c.plan_conversion(Path(sys.argv[1])), Path(sys.argv[2]), progress=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--after-only", action="store_true", help="skip transformers' loader (it needs ~2 GB per billion)")
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--source", type=Path, help="convert this GGUF (kept) instead of writing one of --shape")
    args = parser.parse_args()
    from mathtune.model.convert import plan_conversion
    from mathtune.model.load import embedded_model_path

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="convert-memory-"))
    try:
        source = args.source or scaled_llama_gguf(work / f"llama-{args.shape}-Q8_0.gguf", embedded_model_path(),
                                                  *SHAPES[args.shape])
        plan = plan_conversion(source)
        print(f"{source.name}: {source.stat().st_size / 1e9:.2f} GB; {plan.describe()}")
        for path in ("after",) if args.after_only else ("before", "after"):
            out = work / path
            anon, resident, seconds = peak_rss_anon([sys.executable, "-c", CHILD, str(source), str(out), path])
            size = sum(f.stat().st_size for f in out.iterdir())
            print(f"{path:<7} peak RssAnon {anon / 1e9:5.2f} GB, peak resident {resident / 1e9:5.2f} GB, "
                  f"{seconds:6.1f} s, {size / 1e9:.2f} GB written", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

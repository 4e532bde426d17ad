"""Small bilingual (Spanish/English) math dataset bundled with mathtune.

The files are produced by ``python -m mathtune.data.builtin.generate`` and are
committed as-is, so they can be used without network access:

* ``pairs.jsonl`` - Alpaca-shaped records (``instruction``/``output``).
* ``conversations.jsonl`` - OpenAI-shaped multi-turn records (``messages``).
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).parent


def builtin_files() -> list[Path]:
    """Paths of the bundled dataset files (pairs first, then conversations)."""
    return [BUILTIN_DIR / "pairs.jsonl", BUILTIN_DIR / "conversations.jsonl"]

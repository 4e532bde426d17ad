"""Datasets: record shapes (formats), loading and tokenization (dataset), the bundled set (builtin)."""

"""Benchmarks, reproductions and diagnostics of vlm-chat; run each from the repository root as ``python -m bench.NAME``.

``bench.run`` (speed and memory vs the bare LLM and transformers' Llava), ``bench.reproduce_siglip`` and
``bench.reproduce_summary_tokens`` (small-scale reproductions of published claims), ``bench.yes_no_context`` and
``bench.vqa_errors_vs_tower`` (diagnostics of the demo model). What they measured: docs/benchmarks.md and
docs/reproductions.md.
"""

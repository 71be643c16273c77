"""The report of ``bench.run``: the machine, the markdown tables and the targets' verdicts."""

from __future__ import annotations

import platform
from pathlib import Path

#: Each benchmark target: (comparison, threshold); docs/benchmarks.md states them.
TARGETS = {"step_ratio_vs_llm": ("<=", 1.10), "sample_speedup_vs_hf_llava": (">=", 1.5),
           "decode_ratio_vs_llm": (">=", 0.95)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"target {op} {target}: {'met' if ok else 'MISSED'}"


def report(r: dict, env: dict, sweeps: dict) -> str:
    out = [f"# vlm-chat benchmark ({env['mode']})", ""]
    out += [f"- {k}: {v}" for k, v in env.items()]
    out += ["", table(["metric", "value", "what", "target"], [
        ["step_ratio_vs_llm", r["step_ratio_vs_llm"],
         f"VLM step {r['step_s_vlm']:.2f} s / bare-LLM step {r['step_s_llm']:.2f} s (same LoRA, same loss code; "
         f"batch {r['step_batch']} x {r['step_seq_len']} tokens, {r['step_visual_tokens']} visual)",
         verdict("step_ratio_vs_llm", r["step_ratio_vs_llm"])],
        *([["step_ratio_vs_llm_hf_loss", r["step_ratio_vs_llm_hf_loss"],
             f"VLM step / bare-LLM step with transformers' default loss (logits everywhere, "
             f"{r['step_s_llm_hf_loss']:.2f} s)", ""]] if "step_ratio_vs_llm_hf_loss" in r else []),
        *([["lora_dropout_step_cost", r["lora_dropout_step_cost"],
             f"VLM step with PEFT's LoRA dropout / without it ({r['step_s_vlm_lora_dropout0']:.2f} s)", ""]]
          if "lora_dropout_step_cost" in r else []),
        ["sample_speedup_vs_hf_llava", r["sample_speedup_vs_hf_llava"],
         f"{r['samples_per_s_ours']:.2f} / {r['samples_per_s_llava']:.2f} QA samples/s, {r['samples']} questions on "
         f"{r['sample_images']} image(s); analytic {r['gflop_per_sample_ours']:.1f} vs "
         f"{r['gflop_per_sample_llava']:.1f} GFLOP/sample", verdict("sample_speedup_vs_hf_llava",
                                                                     r["sample_speedup_vs_hf_llava"])],
        ["decode_ratio_vs_llm", r["decode_ratio_vs_llm"],
         f"{r['decode_tok_s_vlm']:.1f} / {r['decode_tok_s_llm']:.1f} tokens/s at {r['decode_context_tokens']} "
         f"context tokens, {r['decode_new_tokens']} new", verdict("decode_ratio_vs_llm", r["decode_ratio_vs_llm"])],
        ["ttft_ms", r["ttft_ms"], f"VLMChat.generate, 1 new token (image in); bare LLM {r['ttft_ms_llm']:.0f} ms", ""],
        ["peak_rss_mb_infer", r["peak_rss_mb_infer"],
         f"process peak after loading and the decode benchmark (after imports: {r['rss_after_imports_mb']:.0f})", ""],
        ["peak_rss_mb_train", r["peak_rss_mb_train"], "process peak after the training-step benchmark", ""],
        ["gflops_train", r["gflops_train"],
         f"analytic {r['step_gflop']:.0f} GFLOP per VLM step / step time; MFU vs matmul "
         f"{100 * r['gflops_train'] / r['matmul_gflops']:.0f}%", ""],
        ["matmul_gflops", r["matmul_gflops"], "plain square matmul, timed between the training steps", ""],
    ])]
    if sweeps.get("batch"):
        out += ["", "## Batch size (VLM vs bare-LLM step)", "", table(
            ["batch", "seq len", "VLM step s", "LLM step s", "ratio", "VLM tokens/s", "GFLOP/s"],
            [[x["batch"], x["step_seq_len"], x["step_s_vlm"], x["step_s_llm"], x["step_ratio_vs_llm"],
              x["step_tokens_per_s_vlm"], x["gflops_train"]] for x in sweeps["batch"]])]
    if sweeps.get("visual"):
        out += ["", f"## Visual tokens (batch {args_batch(sweeps)})", "", table(
            ["mapper", "visual tokens", "mapper params", "seq len", "VLM step s", "LLM step s", "ratio",
             "our samples/s"],
            [[x["mapper"], x["step_visual_tokens"], x["mapper_params"], x["step_seq_len"], x["step_s_vlm"],
              x["step_s_llm"], x["step_ratio_vs_llm"], x["samples_per_s_ours"]] for x in sweeps["visual"]])]
    if sweeps.get("memory"):
        out += ["", f"## LoRA vs QLoRA memory (one process each, batch {args_batch(sweeps)}, 3 steps)", "",
                "RSS loaded: after reading every weight once (the safetensors file is memory-mapped). Peak training: "
                "VmHWM reset after loading, then 3 steps.", "", table(
            ["kind", "RSS after imports MB", "RSS loaded MB", "of it anon / file MB", "peak RSS training MB",
             "step s", "load s", "note"],
            [[x["kind"], x.get("rss_after_imports_mb", "-"), x.get("rss_mb_loaded", "-"),
              f"{x['rss_anon_mb_loaded']:.0f} / {x['rss_file_mb_loaded']:.0f}" if x.get("rss_anon_mb_loaded") else "-",
              x.get("peak_rss_mb_train", "-"), x.get("step_s", "-"), x.get("load_s", "-"),
              x.get("error", f"cuda peak {x['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in x
                    else "" if x.get("train_peak_excludes_load") else "training peak includes the load peak")]
             for x in sweeps["memory"]])]
    return "\n".join(out)


def args_batch(sweeps: dict) -> int:
    return sweeps["step_batch"]

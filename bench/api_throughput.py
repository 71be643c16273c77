"""Throughput and latency of the OpenAI-compatible server: concurrent clients (batched) against one at a time.

    python bench/api_throughput.py [--model DIR] [--clients 8] [--requests 3] [--max-tokens 8] [--json FILE]

Starts ``vlm-chat api``'s app in-process on 127.0.0.1 (a free port) and asks ``clients x requests`` easy-VQA test
questions (a seeded sample, each with its image as a data URL) with the official ``openai`` client, greedily:

1. ``sequential``: one client, one request at a time (every generation is a batch of one);
2. ``concurrent``: ``clients`` threads, each sending its ``requests`` questions one after another (the server batches
   the requests that wait while the model is busy);
3. ``streaming``: the same with ``stream: true`` (server-sent events, batched the same way).

It reports requests/s of each, the speed-up of 2 over 1 (goal >= 3x), p50/p95 latency (and time to the first piece
when streaming), the batch sizes the server ran, failures, and whether every concurrent and streamed answer equals the
sequential one for the same question. Results: docs/api.md and docs/reliability.md, "Serving under load".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: each value reported is a measured latency)."""
    ranked = sorted(values)
    return ranked[max(0, min(len(ranked) - 1, round(q / 100 * len(ranked) + 0.5) - 1))]


def _questions(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (data URL, question) pairs from easy-VQA's test split."""
    from vlm_chat.datasets import easyvqa

    samples = random.Random(seed).sample(easyvqa.load_split("test"), n)
    urls = {}
    for s in samples:
        if s.image not in urls:
            urls[s.image] = "data:image/png;base64," + base64.b64encode(Path(s.image).read_bytes()).decode()
    return [(urls[s.image], s.question) for s in samples]


def _ask(client, model: str, url: str, question: str, max_tokens: int, stream: bool) -> tuple[str, float, float]:
    """One request -> (answer, latency s, time to first piece s)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    start = time.perf_counter()
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        elapsed = time.perf_counter() - start
        return reply.choices[0].message.content, elapsed, elapsed
    first, pieces = None, []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    elapsed = time.perf_counter() - start
    return "".join(pieces), elapsed, first if first is not None else elapsed


def _phase(make_client, model: str, work: list[list[tuple[str, str]]], max_tokens: int, stream: bool) -> dict:
    """Run each list of ``work`` in its own thread (one client each); answers keyed by (client, index)."""
    answers, latencies, firsts, failures = {}, [], [], []
    lock = threading.Lock()

    def client_run(k: int) -> None:
        client = make_client()
        for i, (url, question) in enumerate(work[k]):
            try:
                text, elapsed, first = _ask(client, model, url, question, max_tokens, stream)
            except Exception as e:  # counted and reported: a failure is a result here, not a crash
                with lock:
                    failures.append(f"client {k} request {i}: {e!r}")
                continue
            with lock:
                answers[(k, i)] = text
                latencies.append(elapsed)
                firsts.append(first)

    threads = [threading.Thread(target=client_run, args=(k,)) for k in range(len(work))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "requests": done, "failures": failures, "wall_s": round(wall, 2), "requests_per_s": round(done / wall, 3),
        "p50_s": round(_percentile(latencies, 50), 3) if done else None,
        "p95_s": round(_percentile(latencies, 95), 3) if done else None,
        "first_piece_p50_s": round(_percentile(firsts, 50), 3) if stream and done else None,
        "first_piece_p95_s": round(_percentile(firsts, 95), 3) if stream and done else None,
        "answers": answers,
    }


def measure(model: str | None = None, clients: int = 8, requests: int = 3, max_tokens: int = 8, seed: int = 0,
            streaming: bool = True) -> dict:
    """Run the three phases on one server; see the module docstring.

    Returns:
        A dict of results (JSON-ready once ``answers`` are dropped).
    """
    import openai
    import torch

    from vlm_chat.api import RunningServer, create_app
    from vlm_chat.serving import load_model

    chat = load_model(model)
    app = create_app(chat, model_id="bench", max_batch_size=clients)
    server = RunningServer(app, port=0)
    batcher = app.state.batcher

    def make_client():
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)

    qs = _questions(clients * requests, seed)
    per_client = [qs[k * requests:(k + 1) * requests] for k in range(clients)]
    try:
        _ask(make_client(), "bench", *qs[0], max_tokens, False)  # warm-up, not timed
        results = {}
        phases = [("sequential", [qs], False), ("concurrent", per_client, False)]
        if streaming:
            phases.append(("streaming", per_client, True))
        for name, work, stream in phases:
            first_batch = len(batcher.batch_sizes)
            results[name] = _phase(make_client, "bench", work, max_tokens, stream)
            sizes = batcher.batch_sizes[first_batch:]
            results[name]["batch_sizes"] = {str(b): sizes.count(b) for b in sorted(set(sizes))}
    finally:
        server.stop()
    lone = {qs[i]: a for (_, i), a in results["sequential"]["answers"].items()}
    for name in ("concurrent", "streaming"):
        if name in results:
            got = results[name]["answers"]
            results[name]["equal_to_sequential"] = sum(got[(k, i)] == lone.get(per_client[k][i])
                                                       for (k, i) in got)
    for r in results.values():
        r.pop("answers")
    seq = results["sequential"]["requests_per_s"]
    return {
        "command": "python bench/api_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
                   f"{torch.get_num_threads()}, device {chat.device}",
        "model": model or "demo model", "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
        **results,
        "speedup_concurrent_vs_sequential": round(results["concurrent"]["requests_per_s"] / seq, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="sample of easy-VQA test questions")
    parser.add_argument("--no-streaming", action="store_true", help="skip the streaming phase")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.model, args.clients, args.requests, args.max_tokens, args.seed, not args.no_streaming)
    text = json.dumps(result, indent=2)
    print(text)  # the benchmark's output
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()

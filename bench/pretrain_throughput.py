"""Training-step throughput: SuperPLM sub-model vs stock BertForMaskedLM of the same shape.

Both models see the same masked batches, one after the other within each repetition so that
machine noise hits both alike. Two timings per model:

* ``fwd+bwd``: forward, MLM loss, backward (what weight sharing changes);
* ``step``: the same plus AdamW over all trainable parameters. The SuperPLM's optimiser state
  covers the whole supernet, which is the inherent price of one-shot training.

The stock model computes the vocabulary projection at every position (transformers' default);
the SuperPLM only at masked positions. Architectures are BERT-shaped (qkv = hidden) so a stock
model exists. Run:  python bench/pretrain_throughput.py [--space paper-mlm] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from autotinybert.data import mask_tokens
from autotinybert.modeling import SuperBertConfig, new_supernet
from autotinybert.space import Arch, SearchSpace

DEFAULT_ARCHS = ("L4-H256-F1024-A4-Q256", "L4-H384-F1536-A6-Q384", "L6-H512-F2048-A8-Q512")


def stock_model(arch: Arch, vocab_size: int) -> BertForMaskedLM:
    config = BertConfig(vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
                        num_attention_heads=arch.num_attention_heads, intermediate_size=arch.intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForMaskedLM(config).train()


def batches(count: int, batch: int, seq_len: int, vocab_size: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab_size, (batch, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        masked, labels = mask_tokens(ids, mask, [0, 1, 2, 3, 4], 4, vocab_size, gen)
        out.append({"input_ids": masked, "attention_mask": mask, "labels": labels})
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(arch: Arch, supernet, vocab_size: int, args) -> dict[str, float]:
    supernet.set_arch(arch)
    stock = stock_model(arch, vocab_size)
    data = batches(args.repeats + args.warmup, args.batch_size, args.seq_len, vocab_size)
    optimisers = {"super": torch.optim.AdamW(supernet.parameters(), lr=1e-5),
                  "stock": torch.optim.AdamW(stock.parameters(), lr=1e-5)}
    models = {"super": supernet, "stock": stock}
    times: dict[str, list[float]] = {f"{m}_{k}": [] for m in models for k in ("fwdbwd", "step")}
    for index, batch in enumerate(data):
        for name, model in models.items():
            fb = timed(lambda model=model, batch=batch: model(**batch).loss.backward())
            opt = timed(optimisers[name].step)
            optimisers[name].zero_grad(set_to_none=True)
            if index >= args.warmup:
                times[f"{name}_fwdbwd"].append(fb)
                times[f"{name}_step"].append(fb + opt)
    tokens = args.batch_size * args.seq_len
    return {key: tokens / statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="paper-mlm")
    parser.add_argument("--arch", action="append", help="BERT-shaped architectures (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    space = SearchSpace.load(args.space)
    supernet = new_supernet(SuperBertConfig.from_space(space, vocab_size=args.vocab_size), seed=0).train()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; SuperPLM {space.mode} space, largest {space.largest()}, "
          f"batch {args.batch_size} x seq {args.seq_len}, median of {args.repeats}")
    print()
    print("| architecture | SuperPLM fwd+bwd tok/s | stock fwd+bwd tok/s | time ratio | "
          "SuperPLM step tok/s | stock step tok/s | time ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for text in args.arch or DEFAULT_ARCHS:
        arch = space.check(Arch.parse(text))
        r = measure(arch, supernet, args.vocab_size, args)
        print(f"| {arch} | {r['super_fwdbwd']:,.0f} | {r['stock_fwdbwd']:,.0f} | "
              f"{r['stock_fwdbwd'] / r['super_fwdbwd']:.2f} | {r['super_step']:,.0f} | {r['stock_step']:,.0f} | "
              f"{r['stock_step'] / r['super_step']:.2f} |")
    print("\ntime ratio = SuperPLM time / stock time for the same tokens (target <= 1.15)")


if __name__ == "__main__":
    main()

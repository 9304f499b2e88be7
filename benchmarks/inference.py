"""Per-study inference latency of Brain3D, beside the published code's configuration.

For each preset: encode / prefill / decode seconds, decode tokens per second and peak memory,
median of ``--runs`` runs after one warm-up, every run decoding exactly ``--max-new-tokens`` tokens
(``min_new_tokens = max_new_tokens``) so that runs compare. Weights are random: latency does not
depend on their values. Each configuration runs in its own process, so that peak memory is its own.

The peer ("published") is the published code's encoder geometry built with the same vision
width, depth and heads: a 64x128x128 volume, depth-2 tubelets at depth stride 1 with 14 px
patches (63 x 9 x 9 = 5,103 tokens through every encoder layer), the sequence then average-pooled
to 32 tokens, through the same projector and decoder.

    python benchmarks/inference.py                                    # tiny and demo, CPU
    python benchmarks/inference.py --max-new-tokens 50 --write-docs   # fewer tokens; docs table
    python benchmarks/inference.py --device cuda --presets medgemma-4b --dtype bfloat16 --modes eager compiled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is named like the package it measures: put the package first on the path.
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks.md"
HEADING = "## Inference (issue 3)"
PUBLISHED_GRID = (64, 128, 128)
PUBLISHED_PATCH = 14
PUBLISHED_TUBELET = 2
PUBLISHED_TOKENS = 32
CORPUS = [
    "A large lesion is seen in the left frontal lobe with marked edema.",
    "No focal abnormality is seen.",
    "There is necrosis and compression of the right lateral ventricle.",
]


def _measure(args: argparse.Namespace) -> dict:
    """One configuration in this process: build, warm up, time ``args.runs`` runs."""
    import torch
    from torch import nn

    from inference.configuration_brain3d import Brain3DConfig
    from inference.modeling_brain3d import Brain3D
    from inference.tokenization import train_report_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = train_report_tokenizer([*CORPUS, Brain3DConfig.instruction], vocab_size=300)
    config = Brain3DConfig.from_preset(args.preset)
    if config.text_config.vocab_size < len(tokenizer):
        config = Brain3DConfig.from_preset(args.preset, vocab_size=len(tokenizer))
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = Brain3D(config, tokenizer).eval()
    torch.set_default_dtype(previous_dtype)

    vision = config.vision_config
    if args.config == "published":
        grid = PUBLISHED_GRID
        patch = nn.Conv3d(
            1,
            vision.hidden_size,
            kernel_size=(PUBLISHED_TUBELET, PUBLISHED_PATCH, PUBLISHED_PATCH),
            stride=(1, PUBLISHED_PATCH, PUBLISHED_PATCH),
        ).to(device, dtype)

        def encode(volumes: torch.Tensor) -> torch.Tensor:
            tokens = patch(volumes).flatten(2).transpose(1, 2)
            hidden = model.vision.post_layernorm(model.vision.encoder(inputs_embeds=tokens).last_hidden_state)
            pooled = nn.functional.adaptive_avg_pool1d(hidden.transpose(1, 2), PUBLISHED_TOKENS).transpose(
                1, 2
            )
            return model.projector(pooled)

        encoder_tokens = (
            (grid[0] - PUBLISHED_TUBELET + 1) * (grid[1] // PUBLISHED_PATCH) * (grid[2] // PUBLISHED_PATCH)
        )
        visual_tokens = PUBLISHED_TOKENS
    else:
        grid = tuple(config.input_grid)
        encode = model.encode
        encoder_tokens = config.token_grid[0] * config.token_grid[1] * config.token_grid[2]
        visual_tokens = config.num_visual_tokens

    decode_step = None
    if args.mode == "compiled":
        decode_step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=False)
    volumes = torch.rand((args.batch, 1, *grid), generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def one_run() -> dict[str, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            visual = encode(volumes)
            if device.type == "cuda":
                torch.cuda.synchronize()
            encode_s = time.perf_counter() - start
            output = model.generate_from_visual(
                visual,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                static_cache=args.mode == "compiled",
                decode_step=decode_step,
            )
        return {"encode_s": encode_s, **output.timings}

    # torch.compile compiles on the first call and records CUDA graphs on the next ones.
    for _ in range(max(args.warmup, 3) if args.mode == "compiled" else args.warmup):
        one_run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [one_run() for _ in range(args.runs)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        device_name = torch.cuda.get_device_name()
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        device_name = f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    new_tokens = median["new_tokens"]
    return {
        "preset": args.preset,
        "config": args.config,
        "mode": args.mode,
        "device": device_name,
        "dtype": args.dtype,
        "batch": args.batch,
        "grid": "x".join(map(str, grid)),
        "encoder_tokens": encoder_tokens,
        "visual_tokens": visual_tokens,
        "encode_s": median["encode_s"],
        "prefill_s": median["prefill_s"],
        "decode_s": median["decode_s"],
        "total_s": median["encode_s"] + median["prefill_s"] + median["decode_s"],
        "new_tokens": new_tokens,
        # The first new token comes out of the prefill; the decode loop makes the others.
        "decode_tok_s": (new_tokens - 1) / median["decode_s"] if median["decode_s"] else float("nan"),
        "peak_mb": peak_mb,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _table(results: list[dict]) -> str:
    header = (
        "| preset | configuration | mode | input grid | encoder tokens | visual tokens | encode ms "
        "| prefill ms | decode ms | decode tok/s | total s | peak MB |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['config']} | {r['mode']} | {r['grid']} | {r['encoder_tokens']:,} "
            f"| {r['visual_tokens']} | {r['encode_s'] * 1e3:.1f} | {r['prefill_s'] * 1e3:.1f} "
            f"| {r['decode_s'] * 1e3:.1f} | {r['decode_tok_s']:.0f} | {r['total_s']:.3f} "
            f"| {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


INTRO = (
    "Random weights; median of the runs after warm-up, each decoding exactly `--max-new-tokens` tokens "
    "(min_new_tokens = max_new_tokens). *ours*: the preset's grid, tubelets of its depth at the same depth "
    "stride, 3D pooling to its visual tokens; *published*: the published code's geometry (64x128x128, "
    "depth-2 tubelets at depth stride 1, 14 px patches, all tokens through every encoder layer, then "
    "sequence pooling to 32 tokens) with the same vision width, depth and heads, through the same projector "
    "and decoder. Read the encode column for the encoders: the decoder is the same in both, its times "
    "differ only by the prefix length and by noise. Peak memory on the CPU is the process's peak resident "
    "set (Python, torch and the model included); on a GPU, the peak allocated by torch."
)
GPU_PENDING = (
    "### GPU\n\nPrepared, not yet run (no GPU was lent to the session that wrote this): "
    "`python benchmarks/inference.py --device cuda --presets medgemma-4b --dtype bfloat16 "
    "--modes eager compiled --write-docs` (eager: dynamic KV cache; compiled: static KV cache and "
    "`torch.compile(mode='reduce-overhead')` of the decode step). Target on one H100: at most 1.5 s per "
    "study for 200 tokens, peak memory at most 16 GB.\n"
)


def _write_docs(results: list[dict], args: argparse.Namespace) -> None:
    """Rewrite this device kind's table in this benchmark's section of docs/benchmarks.md; the other
    kind's table and other sections (other benchmarks') are kept."""
    kind = "GPU" if args.device.startswith("cuda") else "CPU"
    note = (
        " On the 2-core development machine, shared with other work, decode times vary by about a third "
        "between runs."
        if kind == "CPU"
        else ""
    )
    command = f"python benchmarks/inference.py {' '.join(sys.argv[1:])}"
    subsection = (
        f"### {kind}\n\n`{command}` on {results[0]['device']}, {results[0]['dtype']}, batch {args.batch}, "
        f"{args.runs} runs, {args.max_new_tokens} new tokens.{note}"
        f"\n\n{_table(results)}\n"
    )
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    before, after, subsections = text, "", {"CPU": "", "GPU": GPU_PENDING}
    if HEADING in text:
        start = text.index(HEADING)
        end = text.find("\n## ", start + len(HEADING))
        before, section = text[:start], text[start : end + 1 if end != -1 else len(text)]
        after = text[end + 1 :] if end != -1 else ""
        for part in section.split("\n### ")[1:]:
            subsections[part.split("\n", 1)[0].strip()] = "### " + part.rstrip("\n") + "\n"
    subsections[kind] = subsection
    section = "\n".join([HEADING, "", INTRO, "", subsections["CPU"], subsections["GPU"]])
    DOCS.write_text(before.rstrip("\n") + "\n\n" + section + ("\n" + after if after else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--configs", nargs="+", default=["ours", "published"], choices=["ours", "published"])
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--write-docs", action="store_true", help=f"replace '{HEADING}' in docs/benchmarks.md"
    )
    parser.add_argument("--single", nargs=3, metavar=("PRESET", "CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        args.preset, args.config, args.mode = args.single
        print(json.dumps(_measure(args)))
        return

    results = []
    for preset in args.presets:
        for config in args.configs:
            for mode in args.modes:
                command = [sys.executable, __file__, "--single", preset, config, mode, *_passthrough(args)]
                environment = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
                completed = subprocess.run(
                    command, capture_output=True, text=True, env=environment, check=False
                )
                if completed.returncode != 0:
                    sys.stderr.write(completed.stderr)
                    raise SystemExit(f"{preset}/{config}/{mode} failed")
                results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                print(_table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(results))
    if args.write_docs:
        _write_docs(results, args)


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--batch={args.batch}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--runs={args.runs}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
    ]


if __name__ == "__main__":
    main()

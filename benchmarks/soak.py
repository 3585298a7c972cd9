"""Soak run: many tiny images and chats in one process; RSS and open file descriptors must stay flat.

    python -m benchmarks.soak [--bundle DIR] [--images 200] [--chats 200] [--json OUT]

Prints RSS (MiB) and open fds at start (after a warm-up call of each kind), middle and end.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import numpy as np
from PIL import Image

import emu3_rt
from emu3_rt import SamplingOptions


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main(argv: list[str] | None = None) -> int:
    from emu3_rt.cli import int_in, tool_parser

    ap = tool_parser("python -m benchmarks.soak", __doc__)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the embedded tiny bundle)")
    ap.add_argument("--images", type=int_in(1), default=200, help="images to generate")
    ap.add_argument("--chats", type=int_in(1), default=200, help="chat replies to generate")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the samples as JSON to OUT")
    args = ap.parse_args(argv)

    model = emu3_rt.load(args.bundle)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    greedy = SamplingOptions(greedy=True)

    def one(i: int) -> None:
        if i % 2 == 0 and i // 2 < args.images:
            model.generate_image(f"a red cat {i}", seed=i)
        else:
            model.chat(f"what is in picture {i}?", images=[picture], sampling=greedy, max_new_tokens=16)

    one(0), one(1)  # warm-up: sessions are created lazily
    gc.collect()
    total = args.images + args.chats
    samples = [("start", 0, rss_mib(), open_fds())]
    t0 = time.perf_counter()
    for i in range(total):
        one(i)
        if i + 1 in (total // 2, total):
            gc.collect()
            samples.append(("middle" if i + 1 == total // 2 else "end", i + 1, rss_mib(), open_fds()))
    elapsed = time.perf_counter() - t0
    print(f"{'point':8} {'calls':>6} {'RSS MiB':>9} {'open fds':>9}")
    for name, calls, rss, fds in samples:
        print(f"{name:8} {calls:6d} {rss:9.1f} {fds:9d}")
    growth = samples[-1][2] - samples[0][2]
    print(f"{args.images} images + {args.chats} chats in {elapsed:.1f}s; RSS growth {growth:+.1f} MiB, "
          f"fds {samples[0][3]} -> {samples[-1][3]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "elapsed_s": elapsed, "rss_growth_mib": growth}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

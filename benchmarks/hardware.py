"""Print this machine's matmul peak (float32/float64, 1 and all BLAS threads) and copy bandwidth.

    python benchmarks/hardware.py [--n 2048] [--repeats 7] [--json results/hardware.json]

Run it on a quiet machine: another heavy process on a 2-core box halves the figures.
Ratios (float32/float64, all threads/1 thread) are measured in the same run.
"""

import argparse

from tfcourse.perf.hardware import measure_hardware, save_hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2048, help="matrix size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also save the figures here")
    args = parser.parse_args()
    hw = measure_hardware(n=args.n, repeats=args.repeats)
    peaks = hw["peak_gflops"]
    for name, gflops in peaks.items():
        print(f"matmul {args.n}x{args.n} {name:12s} {gflops:8.1f} GFLOP/s")
    print(f"copy bandwidth           {hw['copy_bandwidth_gbs']:8.1f} GB/s")
    threads = hw["blas_threads"]
    print(f"ratio float32/float64 (1 thread): {peaks['float32/1'] / peaks['float64/1']:.2f}")
    print(f"ratio {threads} threads/1 (float32):     "
          f"{peaks[f'float32/{threads}'] / peaks['float32/1']:.2f}")
    if args.json:
        print("saved to", save_hardware(hw, args.json))


if __name__ == "__main__":
    main()

"""Command line: ``python -m internlm_kernels {bench,check}``."""

from __future__ import annotations

import argparse
import sys


def check() -> int:
    """Print what can run here: backends with reasons, versions, devices."""
    import torch

    import internlm_kernels as ik
    from internlm_kernels import backends

    print(f"internlm_kernels {ik.__version__}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"python {sys.version.split()[0]}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except Exception as error:
        print(f"triton: not importable ({error})")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"cuda:{index}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                  f"{props.multi_processor_count} SMs")
    else:
        print("no CUDA GPU visible")
    if backends.extension is not None:
        print(f"extension: {backends.extension.build_info()}")
    print("backends (auto tries them in the order "
          f"{' > '.join(backends.AUTO_PREFERENCE)}):")
    for name, status in ik.available_backends().items():
        print(f"  {name:<7} {'available' if status.available else 'unavailable':<12} {status.reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark every op on every available backend")
    from internlm_kernels.bench import cli as bench_cli

    bench_cli.add_arguments(bench)
    commands.add_parser("check", help="print which backends are available here and why not")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    return check()


if __name__ == "__main__":
    sys.exit(main())

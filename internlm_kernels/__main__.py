"""Command line: ``python -m internlm_kernels {bench,check,generate}``."""

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
            served = ""
            if backends.extension is not None:
                archs = backends.EXTENSION_ARCHS
                verdict = backends.arch_list_serves(archs, (props.major, props.minor))
                served = {True: "",
                          None: f"; extension archs {archs or '(none named)'}: cannot tell whether they run here",
                          False: f"; no extension code for it (archs {archs}): auto passes over cuda"}[verdict]
            print(f"cuda:{index}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                  f"{props.multi_processor_count} SMs{served}")
    else:
        print("no CUDA GPU visible")
    if backends.extension is not None:
        print(f"extension: {backends.extension.build_info()}")
    exceptions = "".join(f"; {op}: {' > '.join(order)}" for op, order in backends.AUTO_PREFERENCE_BY_OP.items())
    print(f"backends (auto tries them in the order {' > '.join(backends.AUTO_PREFERENCE)}{exceptions}):")
    for name, status in ik.available_backends().items():
        print(f"  {name:<7} {'available' if status.available else 'unavailable':<12} {status.reason}")
    return 0


def generate(args) -> int:
    """Generate from a local checkpoint directory or a preset (random weights), streaming."""
    import os
    import time

    import torch

    from internlm_kernels.models import InternLMForCausalLM, ModelArgs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = None
    if os.path.isdir(args.model):
        model = InternLMForCausalLM.from_pretrained(args.model, dtype=dtype, device=device, backend=args.backend)
        tokenizer_path = os.path.join(args.model, "tokenizer.model")
        if os.path.exists(tokenizer_path):
            try:
                import sentencepiece
                tokenizer = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
            except ImportError:
                print("tokenizer.model found but sentencepiece is not installed (pip install sentencepiece)")
    else:
        torch.manual_seed(0)
        model = InternLMForCausalLM(ModelArgs.from_name(args.model), backend=args.backend).to(device, dtype).eval()
        print(f"preset {args.model}: random weights (the output is meaningless, the speed is not)")
    if tokenizer is not None:
        ids = [model.args.bos_token_id] if model.args.bos_token_id is not None else []
        ids += tokenizer.encode(args.prompt)
        show = lambda token_ids: tokenizer.decode(token_ids)  # noqa: E731
    else:
        print("no tokenizer: the prompt is read as token ids and the output printed as token ids")
        ids = [int(t) for t in args.prompt.replace(",", " ").split()]
        show = lambda token_ids: " ".join(map(str, token_ids))  # noqa: E731
    prompt = torch.tensor([ids], device=device)
    generated = []

    def stream(token):
        generated.append(int(token[0]))
        print(show([generated[-1]]), end=" " if tokenizer is None else "", flush=True)

    start = time.perf_counter()
    cache_dtype = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[args.kv_cache_dtype]
    model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   on_token=stream, cache_dtype=cache_dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"\n{len(generated)} tokens in {seconds:.2f} s: {len(generated) / seconds:.1f} tokens/s "
          f"(prefill of {len(ids)} included; {device}, {str(dtype).replace('torch.', '')}, backend {args.backend})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark every op on every available backend")
    from internlm_kernels.bench import cli as bench_cli

    bench_cli.add_arguments(bench)
    commands.add_parser("check", help="print which backends are available here and why not")
    gen = commands.add_parser("generate", help="generate text (or token ids) with the reference model")
    gen.add_argument("--model", required=True, help="a local HF-format directory, or a preset name")
    gen.add_argument("--prompt", required=True, help="text (with tokenizer.model) or token ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--device", default=None)
    gen.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e5m2"],
                     help="the KV cache's dtype: the model's (auto), float8_e4m3fn (fp8) or float8_e5m2")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "generate":
        return generate(args)
    return check()


if __name__ == "__main__":
    sys.exit(main())

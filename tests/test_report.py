"""The README table and plots are generated from results files (GPU.md format)."""

import json

from internlm_kernels.bench import report


def _results(path, gpu, date, gbps):
    document = {"gpu": gpu, "date": date, "versions": {"torch": "2.11.0"},
                "ceilings": {"copy_gbps": 3000.0, "gemm_bf16_tflops": 790.0},
                "results": [{"op": "rms_norm_fwd", "provider": "triton", "dtype": "bfloat16",
                             "shape": {"M": 16384, "N": 4096}, "ms": 0.1, "ms_graph": 0.08, "gbps": gbps,
                             "tflops": None,
                             "frac_of_ceiling": gbps / 3000.0, "max_err": 0.004,
                             "speedup_vs": {"eager": 8.0, "torch_compile": 1.3}},
                            {"op": "rms_norm_fwd", "provider": "eager", "dtype": "bfloat16",
                             "shape": {"M": 16384, "N": 4096}, "ms": 0.8, "gbps": gbps / 8, "tflops": None,
                             "frac_of_ceiling": None, "max_err": 0.004, "speedup_vs": {}}]}
    path.write_text(json.dumps(document))
    return str(path)


def test_table_lists_our_rows_with_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path))
    _results(tmp_path / "nvidia-h100-20261201.json", "NVIDIA H100", "2026-12-01", 2700.0)
    newest = _results(tmp_path / "nvidia-h100-20261205.json", "NVIDIA H100", "2026-12-05", 2850.0)
    assert report.latest_results() == [newest]
    table = report.results_table(report.latest_results())
    assert "## NVIDIA H100 (2026-12-05)" in table
    # 0.95 of the copy bandwidth as called; 0.95 * 0.1 / 0.08 from the CUDA graph's replay.
    assert "| rms_norm_fwd | M=16384,N=4096 | triton | 2850.0 GB/s | 0.95 | 1.19 |" in table
    assert "eager 8.00x, torch_compile 1.30x" in table
    assert "| eager |" not in table  # baselines appear as ratios, not rows


def test_mislabelled_rows_are_left_out_and_named(tmp_path, monkeypatch):
    path = _results(tmp_path / "gpu-20261201.json", "GPU", "2026-12-01", 2850.0)
    document = json.load(open(path))
    wrong = dict(document["results"][0], provider="cuda", speedup_vs={"eager": 9.0})
    document["results"][0]["speedup_vs"]["cuda"] = 0.9
    document["results"].append(wrong)
    open(path, "w").write(json.dumps(document))
    monkeypatch.setattr(report, "MISLABELLED", {("gpu-20261201.json", "rms_norm_fwd", "cuda"): "it ran triton"})
    table = report.results_table([path])
    assert "| cuda |" not in table and "cuda 0.90x" not in table
    assert "| rms_norm_fwd | M=16384,N=4096 | triton |" in table
    assert "Left out: the rms_norm_fwd rows of cuda: it ran triton." in table


def test_table_without_results_says_how_to_get_them():
    assert "No GPU results are committed yet" in report.results_table([])


def test_graph_timing_that_cannot_capture_is_reported_not_raised(monkeypatch, capsys):
    import torch
    import triton.testing

    from internlm_kernels.bench import harness

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    assert harness.time_graph_replay(lambda: None, quick=True) is None
    assert "no CUDA graph timing: RuntimeError: operation not permitted" in capsys.readouterr().err


def test_rows_carry_the_graph_time_into_json_csv_and_table(tmp_path):
    from internlm_kernels.bench import harness

    rows = [harness.Row("rms_norm_fwd", "cuda", "bfloat16", {"M": 4, "N": 8}, 0.2, 0.19, 0.21, ms_graph=0.05),
            harness.Row("rms_norm_fwd", "eager", "bfloat16", {"M": 4, "N": 8}, 0.9, 0.8, 1.0)]
    path = tmp_path / "gpu-20261127.json"
    harness.write_results(str(path), {"gpu": "test"}, {}, rows)
    assert [row["ms_graph"] for row in json.loads(path.read_text())["results"]] == [0.05, None]
    csv_lines = (tmp_path / "gpu-20261127.csv").read_text().splitlines()
    assert csv_lines[0].startswith("op,provider,dtype,shape,ms,ms_graph,")
    assert ",0.200000,0.050000," in csv_lines[1] and ",0.900000,-," in csv_lines[2]
    assert "graph ms" in harness.format_table(rows)


def test_targets_give_a_verdict_per_row_of_our_cuda_providers():
    from internlm_kernels.bench.targets import target_lines

    def row(op, provider, shape, frac=None, ms=1.0, ms_graph=None, speedup_vs=None):
        return {"op": op, "provider": provider, "shape": shape, "ms": ms, "ms_graph": ms_graph,
                "frac_of_ceiling": frac, "speedup_vs": speedup_vs or {}}

    norm = {"M": 16384, "N": 4096}
    attention = {"B": 2, "S": 8192, "Hq": 32, "Hkv": 8, "D": 128, "causal": 1}
    decode = {"B": 1, "L": 32768, "Hq": 32, "Hkv": 8, "D": 128}
    document = {"results": [
        row("rms_norm_fwd", "cuda", norm, frac=0.92, speedup_vs={"torch_compile": 1.1, "triton": 1.4}),
        row("rms_norm_fwd", "triton", norm, frac=0.99),  # not ours: no line
        row("rms_norm_fwd", "cuda", {"M": 64, "N": 4096}, frac=0.1),  # not the target's rows
        row("rotary_fwd", "cuda", {}, frac=0.80, ms=1.0, ms_graph=0.9),  # 0.89 from the graph
        row("attention_bwd", "cuda", attention, speedup_vs={"sdpa_flash": 0.71}),
        row("attention_bwd", "cuda_key_block128_atomic_dq", attention, speedup_vs={"sdpa_flash": 0.83}),
        row("attention_bwd", "cuda_atomic_dq", attention),  # no sdpa_flash beside it
        row("attention_bwd", "cuda_key_block128", attention, speedup_vs={"sdpa_flash": 0.99}),  # skipped
        row("attention_decode", "cuda", decode, frac=0.5),
        row("attention_decode", "cuda_paged", decode, frac=0.9),  # another call: no line
        row("attention_decode", "cuda_fp8", decode, frac=0.95),  # another call: no line
    ]}
    lines = target_lines(document, skip=lambda r: r["provider"] == "cuda_key_block128")
    assert "rms_norm_fwd [M=16384] >= 0.9 of copy bandwidth: cuda [N=4096]: 0.92 met" in lines
    assert "rms_norm_fwd [M=16384] >= 1.25 x torch_compile: cuda [N=4096]: 1.10 short" in lines
    assert "rms_norm_fwd [M=16384] >= 1 x triton: cuda [N=4096]: 1.40 met" in lines
    assert "rms_norm_bwd [M=16384] >= 0.8 of copy bandwidth: not in this run" in lines
    assert "rotary_fwd >= 0.85 of copy bandwidth: cuda: 0.80 (graph 0.89) short, met from a graph" in lines
    assert "attention_bwd [S=8192,D=128,causal=1] >= 0.8 x sdpa_flash: cuda [B=2,Hq=32,Hkv=8]: 0.71 short" in lines
    assert ("attention_bwd [S=8192,D=128,causal=1] >= 0.8 x sdpa_flash: cuda_key_block128_atomic_dq "
            "[B=2,Hq=32,Hkv=8]: 0.83 met") in lines
    assert ("attention_bwd [S=8192,D=128,causal=1] >= 0.8 x sdpa_flash: cuda_atomic_dq [B=2,Hq=32,Hkv=8]: "
            "no sdpa_flash in this run") in lines
    assert "attention_fwd [S=8192,D=128,causal=1] >= 0.9 x sdpa_flash: not in this run" in lines
    assert "attention_decode >= 0.8 of copy bandwidth: cuda [B=1,L=32768,Hq=32,Hkv=8,D=128]: 0.50 short" in lines
    # our CUDA rows only: not triton's, not the paged decode's (another call), not the skipped one
    providers = {line.split(": ")[1].split(" [")[0] for line in lines if line.count(": ") >= 2}
    assert providers == {"cuda", "cuda_atomic_dq", "cuda_key_block128_atomic_dq"}
    assert not any("M=64" in line for line in lines)
    assert len(lines) == 12, lines


def test_auto_order_lines_set_cuda_against_triton_per_case():
    from internlm_kernels import backends
    from internlm_kernels.bench.targets import auto_order_lines

    def row(op, provider, shape, ms, ms_graph=None, dtype="bfloat16"):
        return {"op": op, "provider": provider, "shape": shape, "dtype": dtype, "ms": ms, "ms_graph": ms_graph}

    norm = {"M": 16384, "N": 8192}
    document = {"results": [
        row("rms_norm_fwd", "cuda", norm, 0.080, 0.076),
        row("rms_norm_fwd", "triton", norm, 0.071, 0.068),
        row("rms_norm_fwd", "torch_compile", norm, 0.070),  # not a kernel backend: no line
        row("rms_norm_bwd", "triton", norm, 0.250),
        row("rms_norm_bwd", "cuda", norm, 0.119),
        row("rms_norm_bwd", "cuda", {"M": 64, "N": 8192}, 0.01),  # no triton row beside it: no line
        row("rotary_bwd", "cuda", {"B": 4}, 0.120),
        row("rotary_bwd", "triton", {"B": 4}, 0.198),
        row("attention_decode", "cuda_paged", {"B": 1}, 0.05),  # not a default provider: no line
        row("attention_decode", "cuda", {"B": 2}, 0.05),
        row("attention_decode", "triton", {"B": 2}, 0.05),  # a tie: neither, and no disagreement
    ]}
    # an order for the norm backward of its own, as an entry of backends.AUTO_PREFERENCE_BY_OP gives
    def preference(op):
        return backends.CUDA_FIRST if op == "rms_norm.backward" else backends.auto_preference(op)

    lines = auto_order_lines(document, preference)
    assert lines == [
        "rms_norm [M=16384,N=8192] bfloat16: cuda 0.0800 ms, triton 0.0710 ms: triton 1.13x "
        "(from a graph: triton 1.12x); auto: triton",
        "rms_norm.backward [M=16384,N=8192] bfloat16: cuda 0.1190 ms, triton 0.2500 ms: cuda 2.10x; auto: cuda",
        "apply_rotary.backward [B=4] bfloat16: cuda 0.1200 ms, triton 0.1980 ms: cuda 1.65x; "
        "auto: triton (the run differs)",
        "flash_attention_with_kvcache [B=2] bfloat16: cuda 0.0500 ms, triton 0.0500 ms: neither 1.00x; auto: cuda",
    ]
    assert auto_order_lines(document)[1] == \
        "rms_norm.backward [M=16384,N=8192] bfloat16: cuda 0.1190 ms, triton 0.2500 ms: cuda 2.10x"

"""Summaries printed after the benchmarks: the loss's speed ratios and targets (DESIGN.md)."""
import collections
import platform

import pytest
import torch

_LOSS_SPEED = collections.defaultdict(dict)  # (device, dtype, B, N) -> {impl: best seconds}

# DESIGN.md, "Performance targets": fused forward+backward against the eager and compiled
# reference (B=4096, float32; eager only at N=10), and the GPU bandwidth floor at the largest B.
CPU_TARGET = {"eager": 10.0, "compiled": 2.0}
GPU_TARGET = {"eager": 20.0, "compiled": 3.0}
GPU_COPY_BANDWIDTH = 3.0e12  # bytes/s a device-to-device copy reaches on an H100


@pytest.fixture(scope="session")
def loss_speed_results():
    return _LOSS_SPEED


def _ms(seconds):
    return f"{seconds * 1e3:10.3f}" if seconds is not None else f"{'-':>10}"


def _ratio(slow, fast):
    return f"{slow / fast:8.1f}x" if slow is not None and fast is not None else f"{'-':>9}"


def pytest_terminal_summary(terminalreporter, config):
    if not _LOSS_SPEED:
        return
    write = terminalreporter.write_line
    terminalreporter.section("qr_pairwise_loss forward+backward (best of the rounds, ms)")
    write(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    write(f"{'cell':34} {'fused':>10} {'eager':>10} {'compiled':>10} {'eager/f':>9} {'comp/f':>9}")
    largest_b = max(key[2] for key in _LOSS_SPEED)
    for (device, dtype, b, n), times in sorted(_LOSS_SPEED.items(), key=lambda kv: str(kv[0])):
        fused, eager, compiled = (times.get(k) for k in ("fused", "eager", "compiled"))
        cell = f"{device} {str(dtype).removeprefix('torch.')} B={b} N={n}"
        line = f"{cell:34} {_ms(fused)} {_ms(eager)} {_ms(compiled)} "
        line += f"{_ratio(eager, fused)} {_ratio(compiled, fused)}"
        if b == 4096 and dtype == torch.float32 and fused is not None:
            target = CPU_TARGET if device == "cpu" else GPU_TARGET
            checks = [("compiled", compiled)] + ([("eager", eager)] if n == 10 else [])
            for name, slow in checks:
                if slow is not None:
                    met = slow / fused >= target[name]
                    line += f"  {'MET' if met else 'MISSED'} >= {target[name]:g}x {name}"
        if device == "cuda" and b == largest_b and fused is not None:
            # Floor: read both inputs once, write both gradients once.
            bytes_moved = 4 * b * n * torch.tensor([], dtype=dtype).element_size()
            floor = bytes_moved / GPU_COPY_BANDWIDTH
            line += (f"  {bytes_moved / fused / 1e9:.0f} GB/s, {fused / floor:.2f}x the floor "
                     f"({floor * 1e6:.0f} us for {bytes_moved / 1e6:.0f} MB)")
        write(line)

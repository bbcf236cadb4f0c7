"""What the benchmarks measured, printed after them. One policy for every benchmark: a benchmark
measures and reports; a speed target is a ratio against an implementation timed side by side in
the same run, never an absolute time, and a test asserts it (test_loss_speed.py's
test_the_loss_targets, test_train_speed.py). A report prints; it is no test, so no test passes
without checking anything."""
import collections
import platform

import pytest
import torch

_LOSS_SPEED = collections.defaultdict(dict)  # (objective, device, dtype, B, N) -> {impl: (median, best) seconds}
_REPORT = collections.defaultdict(dict)  # section -> {key: line}, printed in order of arrival
GPU_COPY_BANDWIDTH = 3.0e12  # bytes/s a device-to-device copy reaches on an H100


@pytest.fixture(scope="session")
def loss_speed_results():
    return _LOSS_SPEED


@pytest.fixture(scope="session")
def report():
    """report(section, key, line): a line for the summary after the run (a later line of the same
    key replaces the earlier one)."""
    return lambda section, key, line: _REPORT[section].__setitem__(key, line)


def _ms(seconds):
    return f"{seconds * 1e3:9.3f}" if seconds is not None else f"{'-':>9}"


def _ratios(slow, fast):
    """'median / best' of slow against fast."""
    if slow is None or fast is None:
        return f"{'-':>13}"
    return f"{slow[0] / fast[0]:6.1f}/{slow[1] / fast[1]:<6.1f}"


def pytest_terminal_summary(terminalreporter, config):
    for section, lines in _REPORT.items():
        terminalreporter.section(section)
        for line in lines.values():
            terminalreporter.write_line(line)
    if not _LOSS_SPEED:
        return
    write = terminalreporter.write_line
    terminalreporter.section("loss forward+backward: median and best round (ms), ratios median/best")
    write(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    write(f"{'cell':42} {'fused med':>9} {'best':>9} {'eager med':>9} {'compiled':>9} "
          f"{'eager/f':>13} {'comp/f':>13}")
    largest_b = max(key[3] for key in _LOSS_SPEED)
    for (objective, device, dtype, b, n), times in sorted(_LOSS_SPEED.items(), key=lambda kv: str(kv[0])):
        fused, eager, compiled = (times.get(k) for k in ("fused", "eager", "compiled"))
        cell = f"{objective} {device} {str(dtype).removeprefix('torch.')} B={b} N={n}"
        line = (f"{cell:42} {_ms(fused and fused[0])} {_ms(fused and fused[1])} {_ms(eager and eager[0])} "
                f"{_ms(compiled and compiled[0])} {_ratios(eager, fused)} {_ratios(compiled, fused)}")
        if device == "cuda" and b == largest_b and fused is not None:
            # Floor: read both inputs once, write both gradients once.
            bytes_moved = 4 * b * n * torch.tensor([], dtype=dtype).element_size()
            floor = bytes_moved / GPU_COPY_BANDWIDTH
            line += (f"  {bytes_moved / fused[0] / 1e9:.0f} GB/s, {fused[0] / floor:.2f}x the floor "
                     f"({floor * 1e6:.0f} us for {bytes_moved / 1e6:.0f} MB)")
        write(line)

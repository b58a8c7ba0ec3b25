"""benchmarks/step_profile.py's summary of torch.profiler events (the GPU session's `profile` part): its CUDA side,
which a CPU run cannot reach."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_profile import _summary  # noqa: E402


def _event(key, count, cuda=False, cpu_us=0, device_us=0, annotation=False):
    return SimpleNamespace(key=key, count=count, device_type=f"DeviceType.{'CUDA' if cuda else 'CPU'}",
                           self_cpu_time_total=cpu_us, self_device_time_total=device_us,
                           is_user_annotation=annotation)


def test_the_summary_counts_kernels_launches_and_the_step_s_own_syncs_per_step():
    """Device annotations (the optimizer's) span kernels counted already; the harness's one synchronise after the
    last profiled step is not the step's."""
    events = [_event("gemm_kernel", 30, cuda=True, device_us=6000),
              _event("Optimizer.step#AdamW.step", 3, cuda=True, device_us=900, annotation=True),
              _event("cudaLaunchKernel", 31, cpu_us=310),
              _event("cudaStreamSynchronize", 6, cpu_us=3000),
              _event("cudaDeviceSynchronize", 1, cpu_us=50)]
    summary = _summary(events, steps=3)
    assert summary["gpu_kernel_ms"] == 2.0 and summary["launches"] == 10.3 and summary["launch_mean_us"] == 10.0
    assert summary["syncs"] == {"cudaStreamSynchronize": 2.0}
    assert summary["top_host_ms"][0] == ("cudaStreamSynchronize", 1.0)

"""Device-level memory as nvidia-smi shows it: NVML `used`, sampled by a background thread for its peak."""

from __future__ import annotations

import threading
import time
from typing import Any


class NvmlUnavailable(RuntimeError):
    """NVML (nvidia-ml-py) or an NVIDIA driver is missing."""


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # the measure extra installs nvidia-ml-py
        raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
    return pynvml


class NvmlSampler:
    """Poll one GPU's NVML used memory every `interval_s` in a thread; keep the peak.

    nvidia-smi (driver >= 510) reports `used` from the v2 memory struct, which leaves out the driver's
    reserved memory; the v1 struct's used is total - free and includes it. We read v2 where available
    and record which one in `api`.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.002) -> None:
        self._nv = _pynvml()
        try:
            self._nv.nvmlInit()
        except Exception as exc:
            raise NvmlUnavailable(f"nvmlInit failed: {exc}") from exc
        self.handle = self._nv.nvmlDeviceGetHandleByIndex(index)
        self.interval_s = interval_s
        self.api = "v2"
        try:
            self._nv.nvmlDeviceGetMemoryInfo(self.handle, version=self._nv.nvmlMemory_v2)
        except Exception:
            self.api = "v1"
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> int:
        """NVML used bytes right now."""
        if self.api == "v2":
            info = self._nv.nvmlDeviceGetMemoryInfo(self.handle, version=self._nv.nvmlMemory_v2)
        else:
            info = self._nv.nvmlDeviceGetMemoryInfo(self.handle)
        return int(info.used)

    def total(self) -> int:
        """The card's total memory as NVML reports it (nvidia-smi's total)."""
        return int(self._nv.nvmlDeviceGetMemoryInfo(self.handle).total)

    def device_facts(self) -> dict[str, Any]:
        """GPU name, driver and NVML versions."""
        def _s(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        return {
            "gpu_name": _s(self._nv.nvmlDeviceGetName(self.handle)),
            "driver": _s(self._nv.nvmlSystemGetDriverVersion()),
            "nvml_api": self.api,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            u = self.used()
            self.samples += 1
            if u > self.peak:
                self.peak = u
            time.sleep(self.interval_s)

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        self.peak = max(self.peak, self.used())
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling; return the peak used bytes seen."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.peak = max(self.peak, self.used())
        return self.peak

    def note(self, value: int) -> None:
        """Fold a reading taken elsewhere into the peak."""
        self.peak = max(self.peak, value)

"""Peak memory of one step, measured in a fresh process per configuration (the "probe").

Isolation is the point: in one long-lived process, memory freed by one configuration stays resident
(the allocator keeps it) and hides the next configuration's allocations. So every configuration runs
in its own process, forked from a small server that has already imported torch (a fork costs
milliseconds; a fresh interpreter ~2 s of imports). The server never runs a torch computation itself,
so no thread pool or CUDA context exists at the fork.

In the child, for one `Workload`:

1. build the layer and the inputs; run one step at N = 16 (lazy initialisation: thread pools,
   kernel caches) and return freed heap memory to the OS (`malloc_trim`);
2. CPU: reset the high-water mark (write "5" to /proc/self/clear_refs) and read VmRSS;
   CUDA: `torch.cuda.reset_peak_memory_stats()` and `memory_allocated()`;
3. run the step once at N, timed (the parent uses this time to plan its timing rounds);
4. peak = VmHWM - VmRSS before the step (CPU) or `max_memory_allocated()` - allocated before (CUDA):
   the memory the step needs on top of the layer's parameters and the inputs, in MiB.

FLOPs are not counted here: the parent counts them during its warm-up call, a call it needs anyway,
which saves a step per configuration.

The server enforces the per-configuration time limit (the child is killed: status "timeout"); a
child killed by SIGKILL without an answer was most likely taken by the kernel's out-of-memory killer
(status "oom"); allocation errors raised inside the child are "oom" too. Where /proc is missing the
CPU peak is null and the probe still gives the step's time and failures. On platforms without `fork`,
each configuration runs in a fresh interpreter instead (slower, same isolation).

`main(["--serve"])` is the server (JSON lines on stdin/stdout), `main(["--once"])` measures one
request read from stdin (used where `fork` is unavailable); `ENTRY` starts either.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

PROC_STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
MIB = 2**20
SERVER_START_TIMEOUT_S = 180.0
ANSWER_MARGIN_S = 60.0  # beyond the per-configuration limit, before the server itself is presumed stuck
# How server processes start (python -c rather than -m: the package already imports this module).
ENTRY = [sys.executable, "-c", f"import sys; from {__name__} import main; sys.exit(main(sys.argv[1:]))"]


# ---------------------------------------------------------------------------------------- in the child
def _read_status_kib(field_name: str) -> int:
    with open(PROC_STATUS) as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{PROC_STATUS} has no {field_name} line")


def reset_cpu_high_water_mark() -> tuple[bool, str]:
    """Reset this process's VmHWM; returns whether a CPU step's peak memory can be measured, and how (or why not)."""
    if not os.path.exists(PROC_STATUS):
        return False, f"unavailable: {PROC_STATUS} does not exist (peak memory needs Linux /proc)"
    try:
        _read_status_kib("VmHWM")
    except OSError as err:
        return False, f"unavailable: cannot read VmHWM ({err})"
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as err:
        return True, f"VmHWM since fork - VmRSS before the step ({CLEAR_REFS} not writable: {err})"
    return True, "VmHWM - VmRSS before the step, high-water mark reset via /proc/self/clear_refs, fresh forked process"


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim; the fresh process keeps the error small


def measure_in_this_process(work_json: dict[str, Any], threads: int) -> dict[str, Any]:
    """Steps 1-4 of the module docstring for one workload; returns the probe's answer."""
    import torch

    from . import harness

    torch.set_num_threads(threads)
    work = harness.Workload.from_json(work_json)
    answer: dict[str, Any] = {"status": "ok", "error": None, "peak_mem_mb": None,
                              "first_step_ms": None, "memory_note": None, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layer = harness.build_layer(work)
            if work.seq_len > harness.TINY_WARMUP_LEN:
                try:
                    harness.make_step(layer, work, harness.TINY_WARMUP_LEN)()
                except Exception as err:  # the measured step decides the verdict; the warm-up only warns
                    answer["warnings"].append(f"warm-up step at N={harness.TINY_WARMUP_LEN} failed: "
                                              f"{type(err).__name__}: {err}"[:300])
            step = harness.make_step(layer, work)
            gc.collect()
            _malloc_trim()
            if work.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                can_measure, note = reset_cpu_high_water_mark()
                if not can_measure:
                    answer["memory_note"] = note
                before = _read_status_kib("VmRSS") * 1024 if can_measure else None
            start = time.perf_counter()
            step()
            harness.synchronize(work.device)
            answer["first_step_ms"] = (time.perf_counter() - start) * 1e3
            if work.device == "cuda":
                answer["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / MIB
            elif before is not None:
                answer["peak_mem_mb"] = max(0, _read_status_kib("VmHWM") * 1024 - before) / MIB
        except Exception as err:
            answer["status"], answer["error"] = harness.classify_failure(err)
    answer["warnings"] += sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
    return answer


# ---------------------------------------------------------------------------------------- the server
def _fork_and_measure(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request in a forked child, with the time limit; the answer as a dict."""
    timeout_s = float(request["timeout_s"])
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write the answer, leave without running any cleanup
        code = 0
        try:
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            answer = measure_in_this_process(request["workload"], request["threads"])
            with os.fdopen(write_fd, "wb") as out:
                out.write(json.dumps(answer).encode())
        except BaseException:  # noqa: BLE001 - the child must never return into the server loop
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([pipe], [], [], remaining)
            if not ready:
                continue
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    if timed_out:
        return {"status": "timeout", "error": f"exceeded the per-configuration limit of {timeout_s:g} s "
                "(build and one step, in the isolated probe)"}
    return _answer_from(b"".join(chunks), wait_status)


def _die_with_parent() -> None:
    """Linux: the child is killed when the server dies (an interrupted run leaves no orphan computing)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the server's own kill on timeout still bounds the child


def _answer_from(data: bytes, wait_status: int) -> dict[str, Any]:
    if data:
        return json.loads(data)
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGKILL:
            return {"status": "oom", "error": "the probe process was killed by SIGKILL without answering "
                    "(most likely the kernel's out-of-memory killer)"}
        return {"status": "error", "error": f"the probe process died from signal {signal.Signals(sig).name}"}
    return {"status": "error", "error": f"the probe process exited with status {os.waitstatus_to_exitcode(wait_status)} "
            "without answering"}


def _spawn_and_measure(request: dict[str, Any]) -> dict[str, Any]:
    """Where `fork` is unavailable: one fresh interpreter per configuration."""
    try:
        done = subprocess.run(ENTRY + ["--once"], input=json.dumps(request).encode(),
                              capture_output=True, timeout=float(request["timeout_s"]) + 30, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"exceeded the per-configuration limit of {request['timeout_s']:g} s"}
    if done.returncode == 0 and done.stdout.strip():
        return json.loads(done.stdout.decode().strip().splitlines()[-1])
    tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "error": f"the probe process exited with status {done.returncode}: {tail[0][:300]}"}


def serve() -> None:
    """The server loop: a JSON request per line on stdin, a JSON answer per line on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by a mechanism goes to stderr, never into the protocol
    import torch  # noqa: F401  (imported once here, inherited by every forked child)

    from .. import native, registry
    from . import harness  # noqa: F401

    registry.mechanisms()  # import every mechanism module once
    native.available()  # loaded once (the parent built it; see _child_env): every child inherits the kernels
    gc.freeze()  # the imported objects move to a permanent generation: a child's gc.collect() skips them
    # (0.1 s saved per configuration) and does not touch, hence copy, their pages
    measure = _fork_and_measure if hasattr(os, "fork") else _spawn_and_measure
    protocol.write(json.dumps({"ready": True, "fork": hasattr(os, "fork")}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        start = time.perf_counter()
        answer = measure(request)
        answer["probe_wall_s"] = time.perf_counter() - start
        protocol.write(json.dumps(answer) + "\n")


def _child_env() -> dict[str, str]:
    """The environment for server processes: this package importable even when not installed, and the
    native kernels found where this process built them."""
    from .. import native

    env = dict(os.environ)
    if native.build_directory():
        env["TORCH_EXTENSIONS_DIR"] = str(Path(native.build_directory()).parent)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class ProbeServer:
    """The parent's handle on the fork server; `measure(work, timeout_s)` gives the probe's answer.

    The server starts on first use and is restarted if it dies; `close()` ends it. Use as a
    context manager.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ProbeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        from .. import native

        native.available()  # built here, with no time limit, so that the server only loads the library
        proc = subprocess.Popen(ENTRY + ["--serve"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=_child_env())
        hello = self._read_line(proc, SERVER_START_TIMEOUT_S)
        if hello is None or not json.loads(hello).get("ready"):
            self._stop(proc)
            raise RuntimeError("the memory-probe server did not start (see the messages above on stderr)")
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.decode() if line else None

    def measure(self, work_json: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        request = {"workload": work_json, "timeout_s": timeout_s, "threads": self.threads}
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            line = self._read_line(self._proc, timeout_s + ANSWER_MARGIN_S)
        except BrokenPipeError:
            line = None
        if line is None:
            self._stop(self._proc)
            self._proc = None
            return {"status": "error", "error": "the memory-probe server stopped answering; restarted for the next configuration"}
        return json.loads(line)

    def close(self) -> None:
        if self._proc is not None:
            self._stop(self._proc)
            self._proc = None

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """End the server now (it holds nothing worth saving); its probe child, if any, dies with it."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass


def main(argv: list[str]) -> int:
    """The server processes' entry point (see ENTRY)."""
    if argv == ["--serve"]:
        try:
            serve()
        except KeyboardInterrupt:
            return 130
        return 0
    if argv == ["--once"]:
        request = json.loads(sys.stdin.read())
        print(json.dumps(measure_in_this_process(request["workload"], request["threads"])))
        return 0
    print(f"usage: {__name__}.main(['--serve' | '--once']), got {argv!r}", file=sys.stderr)
    return 2


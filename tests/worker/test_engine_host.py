"""The engine host: real spawned subprocesses running real prompts (no mocks of the host).

Spawned children import torch (a few seconds each), so most tests share one module-scoped host;
each test works whether or not an earlier test restarted it, and checks restarts as deltas.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import InputNotFoundError, UnsafePathError
from engine.io import OutputRequest
from engine.settings import EngineSettings
from tests.engine.prompts import invert_prompt, two_branch_prompt
from worker.engine_host import (
    OUT_OF_MEMORY,
    EngineHost,
    HostCrashed,
    HostJob,
    HostResult,
    HostStartFailed,
    JobDeadlineExceeded,
    JobFailed,
    JobInterrupted,
)
from worker.host_io import MemorySink, StorageInputResolver
from worker.host_main import is_out_of_memory
from worker.protocol import JobRecord, JobStatus
from worker.storage import FileStorage, object_key

NODE_MODULE = "tests.worker.nodes_for_tests"
TENANT = "tenant-a"


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine-host")
    for name in ("models", "input", "output", "temp", "storage"):
        (path / name).mkdir()
    return path


@pytest.fixture(scope="module")
def settings(root: Path) -> EngineSettings:
    return EngineSettings(
        models_dirs=[root / "models"],
        input_dir=root / "input",
        output_dir=root / "output",
        temp_dir=root / "temp",
        device="cpu",
        node_modules=[NODE_MODULE],
    )


@pytest.fixture(scope="module")
def storage(root: Path) -> FileStorage:
    return FileStorage(root / "storage")


@pytest.fixture(scope="module")
def host(settings: EngineSettings, storage: FileStorage):
    with EngineHost(settings, storage_url=storage.root.as_uri(), start_timeout_s=120) as engine_host:
        yield engine_host


class Recorder:
    """An on_event callback that keeps every event and the thread it was called on."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.threads: set[int] = set()

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))
        self.threads.add(threading.get_ident())

    def types(self) -> list[str]:
        return [event for event, _ in self.events]

    def of_type(self, event: str) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == event]


def make_job(prompt: dict[str, Any], tenant: str = TENANT, **kwargs: Any) -> HostJob:
    return HostJob(job_id=uuid.uuid4().hex, tenant=tenant, prompt=prompt, **kwargs)


def single(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"1": {"class_type": class_type, "inputs": inputs}}


def run_ok(host: EngineHost, prompt: dict[str, Any], **kwargs: Any) -> HostResult:
    return host.run(make_job(prompt, **kwargs), Recorder(), deadline_s=60)


def pixels(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def png(color: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


# -- in-process pieces ---------------------------------------------------------------------------


def test_engine_host_module_does_not_import_torch():
    check = "import sys, worker.engine_host; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_memory_sink_names_outputs_by_node_and_index():
    sink = MemorySink()
    sink.begin("job-1")
    first = sink.save(OutputRequest(node_id="9", index=0, filename_prefix="sub/ComfyUI"), b"a")
    again = sink.save(OutputRequest(node_id="9", index=0, filename_prefix="ComfyUI"), b"b")
    odd = sink.save(OutputRequest(node_id="a/b", index=1, filename_prefix="x", kind="temp"), b"c")
    assert (first.filename, first.subfolder) == ("9_0.png", "job-1")
    assert (again.filename, again.index) == ("9_1.png", 1)
    assert odd.filename == "a_b_1.png" and odd.type == "temp"
    with pytest.raises(UnsafePathError):
        sink.save(OutputRequest(node_id="9", index=0, filename_prefix="../escape"), b"d")
    produced = sink.drain()
    assert [p.data for p in produced] == [b"a", b"b", b"c"]
    assert object_key("t", produced[0].subfolder, produced[0].filename) == "t/job-1/9_0.png"
    assert sink.drain() == []


def test_storage_input_resolver_reads_only_the_bound_tenants_uploads(tmp_path):
    storage = FileStorage(tmp_path)
    storage.put("alice/inputs/cat.png", b"cat", "image/png")
    storage.put("alice/inputs/sub/dog.jpg", b"dog", "image/jpeg")
    storage.put("alice/inputs/notes.txt", b"txt", "text/plain")
    storage.put("bob/inputs/bob.png", b"bob", "image/png")
    resolver = StorageInputResolver(storage, max_bytes=3)
    with pytest.raises(InputNotFoundError):
        resolver.read("cat.png")  # no tenant bound
    with resolver.bound("alice"):
        assert resolver.read("cat.png") == b"cat"
        assert resolver.read("cat.png [input]") == b"cat"
        assert resolver.list_images() == ["cat.png", "sub/dog.jpg"]
        fingerprint = resolver.fingerprint("cat.png")
        assert fingerprint.startswith("sha256:")
        for name in ("../bob/inputs/bob.png", "/etc/passwd", "C:/x.png"):
            with pytest.raises(UnsafePathError):
                resolver.read(name)
        for name in ("bob.png", "cat.png [output]"):
            with pytest.raises(InputNotFoundError):
                resolver.read(name)
    storage.put("alice/inputs/big.png", b"toolong", "image/png")
    storage.put("alice/inputs/cat.png", b"CAT", "image/png")
    with resolver.bound("alice"):
        with pytest.raises(InputNotFoundError, match="limit"):
            resolver.read("big.png")
        assert resolver.fingerprint("cat.png") != fingerprint
    with resolver.bound("bob"):
        assert resolver.list_images() == ["bob.png"]
    with pytest.raises(UnsafePathError), resolver.bound("../alice"):
        pass


def test_host_job_from_a_job_record():
    record = JobRecord(
        id="j1",
        tenant="t",
        status=JobStatus.RUNNING,
        number=1,
        prompt=invert_prompt(),
        outputs_to_execute=["3"],
    )
    job = HostJob.from_record(record)
    assert (job.job_id, job.tenant, job.prompt, job.outputs_to_execute) == ("j1", "t", invert_prompt(), ["3"])


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not is_out_of_memory(RuntimeError("shapes cannot be multiplied"))


# -- running prompts -----------------------------------------------------------------------------


def test_runs_a_prompt_returning_png_bytes_and_events_in_order(host):
    prompt = invert_prompt(color=0xFF00FF, width=4, height=3, prefix="ignored/prefix")
    job = make_job(prompt)
    events = Recorder()
    result = host.run(job, events, deadline_s=60)

    assert result.job_id == job.job_id and result.host_pid == host.pid
    [output] = result.produced
    assert (output.node_id, output.index, output.type) == ("3", 0, "output")
    assert (output.filename, output.subfolder) == ("3_0.png", job.job_id)
    assert output.content_type == "image/png" and len(output.sha256) == 64
    image = pixels(output.data)
    assert image.shape == (3, 4, 3) and (image == [0, 255, 0]).all()
    assert json.loads(Image.open(io.BytesIO(output.data)).text["prompt"]) == prompt
    assert result.outputs == {
        "3": {"images": [{"filename": "3_0.png", "subfolder": job.job_id, "type": "output"}]}
    }
    assert result.executed == ["1", "2", "3"] and set(result.node_seconds) == {"1", "2", "3"}

    assert events.types() == [
        "execution_start",
        "execution_cached",
        "executing",
        "executing",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    assert [d["node"] for d in events.of_type("executing")] == ["1", "2", "3", None]
    assert events.of_type("executed")[0]["output"] == result.outputs["3"]
    assert all(data["prompt_id"] == job.job_id for _, data in events.events)
    assert events.threads == {threading.get_ident()}


def test_shared_host_stays_warm_and_serves_repeats_from_cache(host):
    prompt = invert_prompt(color=0x00FF00, width=2, height=2)
    first = run_ok(host, prompt)
    second = run_ok(host, prompt)
    assert first.host_pid == second.host_pid == host.pid
    assert first.cached == [] and first.executed == ["1", "2", "3"]
    assert second.cached == ["1", "2"] and second.executed == ["3"]
    assert second.produced[0].sha256 == first.produced[0].sha256
    assert host.status().jobs_run >= 2


def test_per_job_isolation_runs_each_job_in_a_fresh_child(settings):
    with EngineHost(settings, isolation="per-job") as engine_host:
        prompt = invert_prompt(color=0x0000FF, width=2, height=2)
        first = run_ok(engine_host, prompt)
        second = run_ok(engine_host, prompt)
        assert first.host_pid != second.host_pid
        assert second.cached == []  # nothing survives a per-job child
        assert process_gone(first.host_pid)
        assert engine_host.restarts == 0 and engine_host.alive
        assert engine_host.status().isolation == "per-job"


def test_outputs_to_execute_runs_only_the_requested_outputs(host):
    result = run_ok(host, two_branch_prompt(color_a=0x010203, color_b=0x040506), outputs_to_execute=["6"])
    assert result.executed == ["4", "5", "6"]
    assert [p.node_id for p in result.produced] == ["6"]
    with pytest.raises(JobFailed, match="prompt_validation_error"):
        run_ok(host, two_branch_prompt(), outputs_to_execute=["2"])


def test_validation_error_gives_job_failed_with_node_errors(host):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = 0
    with pytest.raises(JobFailed) as caught:
        run_ok(host, prompt)
    error = caught.value
    assert error.type == "prompt_validation_error" and not error.retryable
    assert error.error["error"]["type"] == "prompt_outputs_failed_validation"
    assert error.node_errors["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert error.node_errors["1"]["class_type"] == "EmptyImage"
    assert error.node_id == "1"


def test_node_exception_gives_job_failed_with_node_and_traceback(host):
    restarts, pid = host.restarts, host.pid
    with pytest.raises(JobFailed) as caught:
        run_ok(host, single("TestRaise", message="boom-42"))
    error = caught.value
    assert error.type == "execution_error" and not error.retryable
    assert (error.node_id, error.class_type) == ("1", "TestRaise")
    assert error.error["exception_type"] == "ValueError" and error.error["message"] == "boom-42"
    assert error.traceback and "ops_for_tests.py" in "".join(error.traceback)
    record = error.job_error()
    assert (record.type, record.node_id, record.message) == ("execution_error", "1", "boom-42")
    assert (host.restarts, host.pid) == (restarts, pid)


def test_load_image_reads_the_tenants_upload_from_storage(host, storage):
    storage.put(object_key(TENANT, "inputs", "red.png"), png((255, 0, 0)), "image/png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    result = run_ok(host, prompt)
    assert (pixels(result.produced[0].data) == [0, 255, 255]).all()
    # Another tenant does not see the upload.
    with pytest.raises(JobFailed) as caught:
        run_ok(host, prompt, tenant="tenant-b")
    assert caught.value.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"


# -- cancellation, deadlines, crashes --------------------------------------------------------------


def test_cancel_of_an_interruptible_node_stops_it_without_restart(host):
    host.start()
    restarts, pid = host.restarts, host.pid
    cancel = threading.Event()
    events = Recorder()
    cancelled_at: list[float] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        events(event, data)
        if event == "progress" and data["value"] == 3:
            cancel.set()
            cancelled_at.append(time.monotonic())

    prompt = single("TestSleepSteps", steps=1000, step_seconds=0.02, preview=True)
    with pytest.raises(JobInterrupted) as caught:
        host.run(make_job(prompt), on_event, deadline_s=60, cancel=cancel, cancel_grace_s=10)
    assert time.monotonic() - cancelled_at[0] < 2
    assert not caught.value.restarted and caught.value.node_id == "1"
    assert events.types()[-2:] == ["execution_interrupted", "executing"]
    previews = events.of_type("preview")
    assert previews and isinstance(previews[0]["image"], bytes)
    assert (host.restarts, host.pid) == (restarts, pid)
    # The interrupt does not leak into the next job.
    assert run_ok(host, single("TestSleepSteps", steps=2, step_seconds=0.0, preview=False)).executed == ["1"]


def test_cancel_of_a_node_that_ignores_it_kills_the_child_after_the_grace(host):
    host.start()
    restarts, pid = host.restarts, host.pid
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "executing" and data["node"] == "1":
            cancel.set()
            cancelled_at.append(time.monotonic())

    with pytest.raises(JobInterrupted) as caught:
        host.run(
            make_job(single("TestSleepForever", spawn_child=False)),
            on_event,
            deadline_s=60,
            cancel=cancel,
            cancel_grace_s=1,
        )
    waited = time.monotonic() - cancelled_at[0]
    assert 1 <= waited < 5
    assert caught.value.restarted
    assert host.restarts == restarts + 1 and host.pid != pid
    assert run_ok(host, invert_prompt(color=0x111111)).host_pid == host.pid


def test_deadline_kills_the_whole_process_group_and_restarts(host):
    host.start()
    restarts, pid = host.restarts, host.pid
    events = Recorder()
    started = time.monotonic()
    with pytest.raises(JobDeadlineExceeded) as caught:
        host.run(make_job(single("TestSleepForever", spawn_child=True)), events, deadline_s=1.5)
    assert 1.5 <= time.monotonic() - started < 6
    assert caught.value.retryable and caught.value.deadline_s == 1.5
    assert host.restarts == restarts + 1 and host.pid != pid
    assert process_gone(pid)
    helper = events.of_type("progress")[0]["value"]  # the `sleep` the node started
    assert process_gone(helper)
    assert run_ok(host, invert_prompt(color=0x222222)).host_pid == host.pid


def test_kill_9_of_the_child_mid_job_gives_host_crashed_and_a_fresh_child(host):
    host.start()
    restarts, pid = host.restarts, host.pid

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "progress" and data["value"] == 1:
            os.kill(pid, signal.SIGKILL)

    prompt = single("TestSleepSteps", steps=1000, step_seconds=0.02, preview=False)
    with pytest.raises(HostCrashed, match="SIGKILL") as caught:
        host.run(make_job(prompt), on_event, deadline_s=60)
    assert caught.value.exitcode == -signal.SIGKILL and caught.value.retryable
    assert host.restarts == restarts + 1 and host.pid != pid
    result = run_ok(host, invert_prompt(color=0x333333))
    assert result.host_pid == host.pid != pid


def test_a_node_that_exits_the_process_gives_host_crashed(host):
    host.start()
    restarts = host.restarts
    with pytest.raises(HostCrashed, match="exited with code 3") as caught:
        run_ok(host, single("TestCrash", mode="exit"))
    assert caught.value.exitcode == 3
    assert host.restarts == restarts + 1
    assert run_ok(host, invert_prompt(color=0x444444)).executed


def test_out_of_memory_gives_job_failed_and_restarts_the_child(host):
    host.start()
    restarts, pid = host.restarts, host.pid
    with pytest.raises(JobFailed) as caught:
        run_ok(host, single("TestOutOfMemory", mode="python"))
    error = caught.value
    assert error.type == OUT_OF_MEMORY and error.retryable
    assert (error.node_id, error.class_type) == ("1", "TestOutOfMemory")
    assert error.error["exception_type"] == "MemoryError"
    assert host.restarts == restarts + 1 and host.pid != pid
    assert run_ok(host, invert_prompt(color=0x555555)).executed


def test_leaving_run_while_the_child_works_restarts_it(host):
    host.start()
    restarts, pid = host.restarts, host.pid

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "progress":
            raise RuntimeError("event store is down")

    prompt = single("TestSleepSteps", steps=1000, step_seconds=0.02, preview=False)
    with pytest.raises(RuntimeError, match="event store is down"):
        host.run(make_job(prompt), on_event, deadline_s=60)
    assert host.restarts == restarts + 1 and host.pid != pid
    assert process_gone(pid)
    assert run_ok(host, invert_prompt(color=0x666666)).executed


def test_a_broken_node_module_fails_the_start(settings):
    broken = settings.model_copy(update={"node_modules": ["tests.worker.no_such_nodes"]})
    engine_host = EngineHost(broken, start_timeout_s=60)
    try:
        with pytest.raises(HostStartFailed, match="no_such_nodes"):
            engine_host.start()
        assert not engine_host.alive
    finally:
        engine_host.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine_host.run(make_job(invert_prompt()), Recorder(), deadline_s=5)

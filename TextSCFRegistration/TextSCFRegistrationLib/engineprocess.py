"""The engine in a process of its own (``python -m textscf.worker``), as SlicerTotalSegmentator runs its engine.

A crash or an out-of-memory in torch or ITK ends that process, not Slicer; Cancel ends it (terminate, then kill after
a second) at any stage. The job is a temporary folder: the inputs written as raw NRRD straight from the nodes'
buffers, ``job.json``, and the ``output`` folder the worker renames into place when it is complete. The folder is
removed when the job ends, whatever happened. The worker's protocol is described in ``textscf/worker.py``.
"""

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

from . import conversions, nrrd

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_SECONDS = 0.05
TERMINATE_GRACE_SECONDS = 1.0


class EngineProcessError(RuntimeError):
    """The engine process ended without a result (a crash, a signal, memory exhausted)."""


@dataclass
class EngineResult:
    """What the engine process wrote: raw NRRD files (``nrrd.NrrdFile``) and the statistics. The files live as long
    as the job folder."""

    folder: str
    stats: dict
    region_names: list
    displacement: nrrd.NrrdFile
    warped: nrrd.NrrdFile
    jacobian: nrrd.NrrdFile
    warped_labels: nrrd.NrrdFile = None
    segmentations: dict = field(default_factory=dict)  # "fixed" / "moving" -> nrrd.NrrdFile

    @classmethod
    def read(cls, folder):
        with open(os.path.join(folder, "result.json"), encoding="utf-8") as f:
            summary = json.load(f)
        files = {name: nrrd.read_header(os.path.join(folder, path)) for name, path in summary["files"].items()}
        return cls(folder=folder, stats=summary["stats"], region_names=summary["region_names"],
                   displacement=files["displacement"], warped=files["warped"], jacobian=files["jacobian"],
                   warped_labels=files.get("warped_labels"),
                   segmentations={role: files[f"{role}_labels"] for role in ("fixed", "moving")
                                  if f"{role}_labels" in files})


def pythonExecutable():
    """The Python that runs the worker: Slicer's ``PythonSlicer`` in the application, else this Python."""
    import slicer

    if hasattr(slicer, "app"):
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        return shutil.which("PythonSlicer") or os.path.join(os.path.dirname(sys.executable), name)
    return sys.executable


def temporaryFolder():
    """Where job folders go: Slicer's temporary folder in the application (Application Settings), else the system's.
    A 512 x 512 x 300 CT pair needs about 2.5 GB there while it runs."""
    import slicer

    if hasattr(slicer, "app"):
        os.makedirs(slicer.app.temporaryPath, exist_ok=True)
        return slicer.app.temporaryPath
    return None


class EngineJob:
    """One run of the engine process. Use as a context manager: the job folder is removed at the end.

    ``process`` is the running ``subprocess.Popen`` (None before and after), for callers that need its ID.
    """

    def __init__(self, keepFolder=False):
        self.folder = tempfile.mkdtemp(prefix="TextSCF-job-", dir=temporaryFolder())
        self.keepFolder = keepFolder
        self.job = {"output": "output"}
        self.process = None
        self.cancelSeconds = None  # how long the process took to end once cancelled

    def __enter__(self):
        return self

    def __exit__(self, excType, exc, traceback):
        self.stop()
        if not self.keepFolder:
            shutil.rmtree(self.folder, ignore_errors=True)
        return False

    # -- inputs -------------------------------------------------------------------------------------------------------

    def addVolume(self, key, volumeNode):
        """Write a volume node as the job's ``key`` image (``fixed``, ``moving``, ...), straight from its buffer."""
        conversions.writeVolumeNode(volumeNode, os.path.join(self.folder, f"{key}.nrrd"))
        self.job[key] = f"{key}.nrrd"

    def addLabelImage(self, key, image):
        """Write a SimpleITK label map as the job's ``key`` (``fixed_labels``, ``moving_labels``)."""
        if image is not None:
            conversions.writeLabelImage(image, os.path.join(self.folder, f"{key}.nrrd"))
            self.job[key] = f"{key}.nrrd"

    def addTransform(self, transform):
        import SimpleITK as sitk

        if transform is not None:
            sitk.WriteTransform(transform, os.path.join(self.folder, "initial_transform.h5"))
            self.job["initial_transform"] = "initial_transform.h5"

    # -- running ------------------------------------------------------------------------------------------------------

    def run(self, options, segment=None, progress=None, cancel=None, poll=None, log=None):
        """Run the worker on the job; returns an ``EngineResult``.

        :param options: dict of ``RegistrationOptions`` fields.
        :param segment: the automatic segmentation settings (see ``textscf/worker.py``), or None.
        :param progress: ``f(stage, fraction, secondsLeft)`` for each progress line (fraction of the job).
        :param cancel: ``f() -> bool``, polled every 50 ms; True ends the process and raises CancelledError.
        :param poll: called every 50 ms while waiting (the widget keeps the GUI alive with it).
        :param log: ``f(line)`` for the engine's lines for the user.
        """
        self.job.update(options=options, segment=segment)
        jobPath = os.path.join(self.folder, "job.json")
        with open(jobPath, "w", encoding="utf-8") as f:
            json.dump(self.job, f, indent=1)
        lines = self._start(jobPath)
        error, tail = self._follow(lines, progress, cancel, poll, log)
        returnCode = self.process.wait()
        self.stop()
        output = os.path.join(self.folder, self.job["output"])
        if returnCode != 0 or not os.path.isdir(output):
            raise self._failure(returnCode, error, tail)
        return EngineResult.read(output)

    def _start(self, jobPath):
        """Start the worker; returns the queue its output lines arrive in (("out" | "err", line), None at the end)."""
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join([MODULE_DIR] + [p for p in [environment.get("PYTHONPATH")] if p])
        environment["PYTHONUNBUFFERED"] = "1"
        # Its own process group: Cancel ends the whole group, the real interpreter too where PythonSlicer is a
        # launcher that starts it as a child.
        extra = ({"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
                 if os.name == "nt" else {"start_new_session": True})
        self.process = subprocess.Popen([pythonExecutable(), "-m", "textscf.worker", jobPath], cwd=self.folder,
                                        env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                        **extra)
        lines = queue.SimpleQueue()
        for kind, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            threading.Thread(target=_readLines, args=(kind, stream, lines), daemon=True,
                             name=f"TextSCF worker {kind}").start()
        return lines

    def _follow(self, lines, progress, cancel, poll, log):
        """Handle the worker's lines until both streams end; returns (error message, last lines of stderr)."""
        ended, error, tail = 0, None, []
        while ended < 2:
            try:
                item = lines.get(timeout=POLL_SECONDS)
            except queue.Empty:
                item = ()
            if item is None:
                ended += 1
            elif item:
                kind, line = item
                message = _message(line) if kind == "out" else None
                if message is None:
                    logging.info("TextSCF engine: %s", line)
                    tail = (tail + [line])[-20:]
                elif "error" in message:
                    error = message
                else:
                    _dispatch(message, progress, log)
            if cancel is not None and cancel():
                self.cancel()
            if poll is not None:
                poll()
        return error, tail

    def cancel(self):
        """End the process (terminate, then kill after a second) and raise CancelledError."""
        from textscf.errors import CancelledError

        start = time.monotonic()
        self.stop()
        self.cancelSeconds = time.monotonic() - start
        raise CancelledError("registration cancelled: the engine process was stopped; the scene is unchanged")

    def stop(self):
        """End the process and its group: terminate, then kill what is left after ``TERMINATE_GRACE_SECONDS``."""
        process = self.process
        if process is None:
            return
        if process.returncode is None and not _exited(process):
            _endGroup(process)
        process.wait()
        for stream in (process.stdout, process.stderr):
            stream.close()
        self.process = None

    def _failure(self, returnCode, error, tail):
        """The exception for a job that gave no result: the engine's own error class where it said one."""
        from textscf import errors

        detail = "\n".join(tail[-8:])
        if error is not None:
            kind, text = error.get("type", ""), error.get("error", "")
            if kind == "CancelledError":
                return errors.CancelledError(text)
            if kind == "MemoryError":
                return EngineProcessError("the registration ran out of memory. Fix: choose the CPU if the GPU was "
                                          "used, close other programs, or crop the volumes")
            errorClass = getattr(errors, kind, None)
            if isinstance(errorClass, type) and issubclass(errorClass, errors.TextSCFError):
                return errorClass(text)
            return EngineProcessError(f"the registration failed: {text}" + (f"\n{detail}" if detail else ""))
        # Killed by a signal: a negative status, or 128 + the signal where a launcher (PythonSlicer) reports it.
        signalNumber = -returnCode if returnCode < 0 else returnCode - 128 if 128 < returnCode < 160 else None
        if signalNumber is not None:
            import signal

            try:
                name = signal.Signals(signalNumber).name
            except ValueError:
                name = f"signal {signalNumber}"
            return EngineProcessError(
                f"the registration process was ended by {name} before it finished"
                + (" (the system ends a process this way when memory runs out; choose the CPU, close other "
                   "programs or crop the volumes)" if name == "SIGKILL" else "")
                + ". The scene was left as it was." + (f"\n{detail}" if detail else ""))
        return EngineProcessError(f"the registration process stopped with exit status {returnCode} and no result. "
                                  "The scene was left as it was." + (f"\n{detail}" if detail else ""))


def _exited(process):
    """Whether the process has ended, without reaping it (while it is a zombie its process group ID stays ours)."""
    if os.name == "nt":
        return process.poll() is not None
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _endGroup(process):
    """Terminate the worker's process group (Windows: the process), then kill the group (Windows: the process tree)
    when it has not ended within ``TERMINATE_GRACE_SECONDS``. The group leader is not reaped before the kill, so the
    group ID cannot have been reused."""
    if os.name == "nt":
        process.terminate()
        try:
            process.wait(TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW, check=False)
        return
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
    while time.monotonic() < deadline and not _exited(process):
        time.sleep(0.01)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what is left of the group (a launcher's child)
    except ProcessLookupError:
        pass


def _readLines(kind, stream, lines):
    try:
        for line in stream:
            line = line.rstrip("\r\n")
            if line:
                lines.put((kind, line))
    except (OSError, ValueError):  # the stream was closed (process stopped)
        pass
    lines.put(None)


def _message(line):
    """A protocol message (dict) from a line of the worker's standard output, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _dispatch(message, progress, log):
    if "stage" in message:
        if progress is not None:
            progress(str(message["stage"]), float(message.get("fraction", 0.0)), message.get("seconds_left"))
    elif "log" in message:
        if log is not None:
            log(str(message["log"]))
    elif "warning" in message:
        import builtins

        category = getattr(builtins, str(message.get("category", "")), UserWarning)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = UserWarning
        warnings.warn(str(message["warning"]), category, stacklevel=2)

"""The engine as a process of its own (``python -m textscf.worker``): the protocol the Slicer module relies on."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[1] / "TextSCFRegistration"


@pytest.fixture(scope="module")
def pair():
    from textscf.phantom import make_example_pair

    return make_example_pair(shape=(48, 40, 64), spacing=(8.0, 8.0, 8.0))


def write_job(folder, pair, checkpoint, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(pair["fixed"], str(folder / "fixed.nrrd"), False)
    sitk.WriteImage(pair["moving"], str(folder / "moving.nrrd"), False)
    job = {"fixed": "fixed.nrrd", "moving": "moving.nrrd", "output": "output",
           "options": {"checkpoint": str(checkpoint), "device": "cpu", "preset": "abdomen-ct", "init": "none",
                       "refine_iterations": 0, "refine_field_iterations": 0}}
    job.update(extra)
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json"


def start(job_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "textscf.worker", str(job_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_worker_registers_and_streams_json_progress(tmp_path, pair, tiny_abdomen_checkpoint):
    sitk.WriteImage(pair["fixed_labels"], str(tmp_path / "fixed_labels.nrrd"), False)
    sitk.WriteImage(pair["moving_labels"], str(tmp_path / "moving_labels.nrrd"), False)
    job = write_job(tmp_path, pair, tiny_abdomen_checkpoint, fixed_labels="fixed_labels.nrrd",
                    moving_labels="moving_labels.nrrd")
    process = start(job)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr

    messages = [json.loads(line) for line in stdout.splitlines()]  # standard output holds JSON lines only
    progress = [m for m in messages if "stage" in m]
    fractions = [m["fraction"] for m in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    stages = [m["stage"] for m in progress]
    assert {"Reading inputs", "load model", "register", "resample field", "Writing the results", "Done"} <= set(stages)
    assert all(set(m) == {"stage", "fraction", "seconds_left"} for m in progress)
    assert any(m.get("log", "").startswith("schedule: ") for m in messages)

    output = tmp_path / "output"
    assert not (tmp_path / "output.partial").exists()
    summary = json.loads((output / "result.json").read_text())
    assert set(summary["files"]) == {"displacement", "warped", "jacobian", "warped_labels"}
    assert summary["region_names"][0] == "background" and "liver" in summary["region_names"]
    assert summary["stats"]["device"] == "cpu" and 0.0 <= summary["stats"]["mean_dice"] <= 1.0
    field = sitk.ReadImage(str(output / "displacement.nrrd"))
    assert field.GetPixelID() == sitk.sitkVectorFloat32 and field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == pair["fixed"].GetSize()
    np.testing.assert_allclose(field.GetOrigin(), pair["fixed"].GetOrigin())
    np.testing.assert_allclose(field.GetDirection(), pair["fixed"].GetDirection())
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "jacobian.nrrd")))
    assert jacobian.min() == pytest.approx(summary["stats"]["jacobian_min"], rel=1e-6)


def test_corrupt_input_fails_with_one_json_error_line(tmp_path, pair, tiny_abdomen_checkpoint):
    job = write_job(tmp_path, pair, tiny_abdomen_checkpoint)
    moving = tmp_path / "moving.nrrd"
    moving.write_bytes(moving.read_bytes()[: moving.stat().st_size // 2])  # truncated, as a failed copy leaves it
    process = start(job)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    last = json.loads(stdout.splitlines()[-1])
    assert last["type"] == "InputError" and "moving image" in last["error"] and "moving.nrrd" in last["error"]
    assert not (tmp_path / "output").exists() and not (tmp_path / "output.partial").exists()


def test_missing_job_file_and_bad_options_are_bad_input(tmp_path, pair, tiny_abdomen_checkpoint):
    process = start(tmp_path / "nothing.json")
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and json.loads(stdout.splitlines()[-1])["type"] == "InputError"

    job = write_job(tmp_path / "bad", pair, tiny_abdomen_checkpoint)
    settings = json.loads(job.read_text())
    settings["options"]["no_such_option"] = 1
    job.write_text(json.dumps(settings))
    process = start(job)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    last = json.loads(stdout.splitlines()[-1])
    assert last["type"] == "TypeError" and "no_such_option" in last["error"]


def test_a_killed_worker_leaves_no_output_folder(tmp_path, pair, tiny_abdomen_checkpoint):
    job = write_job(tmp_path, pair, tiny_abdomen_checkpoint)
    process = start(job)
    for line in process.stdout:  # the first progress line: the worker is running
        assert json.loads(line)["stage"] == "Reading inputs"
        break
    process.send_signal(signal.SIGKILL)
    start_wait = time.monotonic()
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert time.monotonic() - start_wait < 2.0
    process.stdout.close()
    process.stderr.close()
    assert not (tmp_path / "output").exists()


@pytest.mark.skipif(os.name != "posix", reason="orphans are detected by their parent ID on POSIX")
def test_the_worker_ends_when_the_process_that_started_it_dies(tmp_path, pair, tiny_abdomen_checkpoint):
    """Slicer crashing (here: the process that started the worker, SIGKILLed) must not leave an engine running."""
    job = write_job(tmp_path, pair, tiny_abdomen_checkpoint)
    starter = (
        "import os, subprocess, sys, time\n"
        f"worker = subprocess.Popen([sys.executable, '-m', 'textscf.worker', {str(job)!r}],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(worker.pid, flush=True)\n"
        "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True, env=env)
    worker_pid = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker is importing its modules
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5.0  # the worker checks every 0.5 s; its registration alone takes longer
    while not has_ended(worker_pid):
        if time.monotonic() > deadline:
            os.kill(worker_pid, signal.SIGKILL)
            pytest.fail("the worker kept running after the process that started it was killed")
        time.sleep(0.1)
    assert not (tmp_path / "output").exists()


def has_ended(pid):
    """Whether a process has ended: gone, or (Linux) a zombie its new parent has not reaped yet."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False

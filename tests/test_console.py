"""The terminal gets the job's own lines and real errors; the run directory's log gets every line."""

import subprocess
import sys
import textwrap

from instructdiff_ray.console import to_terminal

# lines as Ray 2.60 prints them on a driver (copied from a demo run)
AUTH = (b"2026-11-30 08:44:33,635\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
        b"Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.\n")
STARTED = b"2026-11-30 08:49:04,978\tINFO worker.py:2038 -- Started a local Ray instance.\n"
CORE = (b"[2026-11-30 08:44:56,380 E 6829 6829] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(ScoreActor))' "
        b"and ID: 'ef9e' has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
RAY_ERROR = b"[2026-11-30 08:44:56,380 E 6829 6829] core_worker.cc:900: The raylet died unexpectedly.\n"
WORKER_OWN = b"\x1b[36m(_train_and_print pid=7044)\x1b[0m [warmup] step 1  loss 0.7742  lr 2.50e-04  5s\n"
WORKER_RAY = b"\x1b[36m(MapWorker pid=7044, ip=10.0.0.2)\x1b[0m 2026-11-30 08:44:56,380\tWARNING util.py:1 -- noise\n"


def test_ray_noise_stays_off_the_terminal_and_errors_reach_it():
    assert not to_terminal(AUTH) and not to_terminal(STARTED) and not to_terminal(CORE) and not to_terminal(WORKER_RAY)
    assert to_terminal(RAY_ERROR) and to_terminal(WORKER_OWN)
    assert to_terminal(b"[score r1] 40/40 rows (100%)\n") and to_terminal(b"error: something the user must fix\n")


def test_run_log_keeps_every_line_and_the_traceback(tmp_path):
    """A child process writing straight to fd 2 (as Ray's C++ core does) inside run_log: the
    terminal (here a pipe) gets the person's lines without colour codes, the log file every byte."""
    script = textwrap.dedent(f"""
        import os, sys
        from instructdiff_ray.console import run_log
        with run_log({str(tmp_path / "run")!r}) as log:
            print("[run] log at", log, file=sys.stderr, flush=True)
            os.write(2, {AUTH!r} + {CORE!r} + {WORKER_OWN!r})
            print("a result on stdout")
            raise SystemExit(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert res.returncode == 3
    terminal = res.stderr.decode().splitlines()
    assert terminal[0].startswith("[run] log at ") and terminal[1:] == ["(_train_and_print pid=7044) [warmup] step 1  loss 0.7742  lr 2.50e-04  5s"]
    assert res.stdout.decode() == "a result on stdout\n"
    (log,) = (tmp_path / "run" / "_logs").glob("driver-*.log")
    assert terminal[0] == f"[run] log at {log}"
    text = log.read_bytes()
    for line in (AUTH, CORE, WORKER_OWN.replace(b"\x1b[36m", b"").replace(b"\x1b[0m", b""), b"a result on stdout\n",
                 b"SystemExit: 3"):
        assert line in text


def test_run_log_on_an_object_store_is_uploaded_when_the_command_ends(s3):
    """An object store cannot be appended to: the log is written locally, then put at its key."""
    s3.mkdir("console-log")
    script = textwrap.dedent("""
        import sys
        from instructdiff_ray.console import run_log
        with run_log("s3://console-log/run") as log:
            print("[run] log at", log, file=sys.stderr, flush=True)
            raise RuntimeError("a failed command keeps its log too")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert res.returncode == 1 and b"RuntimeError" in res.stderr
    url = res.stderr.decode().split("[run] log at ", 1)[1].splitlines()[0].strip()
    assert url.startswith("s3://console-log/run/_logs/driver-")
    s3.invalidate_cache()
    text = s3.cat(url).decode()
    assert text.startswith(f"[run] log at {url}\n") and "RuntimeError: a failed command keeps its log too" in text


def test_a_command_refused_for_its_configuration_leaves_nothing(tmp_path):
    from instructdiff_ray.config import ConfigError
    from instructdiff_ray.console import run_log

    run = tmp_path / "new-run"
    try:
        with run_log(str(run)):
            raise ConfigError("out: a local path on a cluster whose nodes share no disk")
    except ConfigError:
        pass
    assert not run.exists()  # neither the log nor the directories made for it
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "keep.txt").write_text("x")
    try:
        with run_log(str(tmp_path / "old-run")):
            raise ConfigError("refused")
    except ConfigError:
        pass
    assert sorted(p.name for p in (tmp_path / "old-run").iterdir()) == ["keep.txt"]


def test_a_refused_command_removes_the_parent_directories_it_made(tmp_path):
    from instructdiff_ray.config import ConfigError
    from instructdiff_ray.console import run_log

    try:
        with run_log(str(tmp_path / "runs" / "a" / "b")):
            raise ConfigError("refused")
    except ConfigError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_everything_passes_as_written_with_verbose_and_long_unfinished_lines_are_not_held(tmp_path):
    """-v / --progress ray: every byte reaches the terminal as it comes (a bar's `\\r` redraws are not
    lines); filtered, a line longer than the filter holds back is passed on rather than kept."""
    for verbose, data in ((True, AUTH + b"50%\r100%\r"), (False, b"x" * 70000 + b"\r" + b"y" * 10 + b"\n")):
        script = textwrap.dedent(f"""
            import os
            from instructdiff_ray.console import run_log
            with run_log({str(tmp_path / str(verbose))!r}, verbose={verbose}):
                os.write(2, {data!r})
        """)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stderr == data, res.stderr[-200:]
        (log,) = (tmp_path / str(verbose) / "_logs").glob("driver-*.log")
        assert log.read_bytes() == data

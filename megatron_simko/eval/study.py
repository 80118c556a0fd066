"""The pass@K study from one command: a warm-started tiny model, every loss trained with the same data, budget
and hyper-parameters, base + final models evaluated on held-out problems, figures and a table.

    python -m megatron_simko.eval.study --config examples/configs/toy_study.yaml [--variant smoke|dev] [--out-dir D]

Steps, each skipped when its output exists (a re-run resumes; an unfinished training run resumes from its
checkpoints, since the trainer's checkpoint.resume defaults to auto):

1. ``model/``          the tiny model (models/tiny.py) for the study's ``task`` (difficulty, prompt style), SFT
2. ``data/train.jsonl``, ``data/validation.jsonl``, ``heldout.jsonl``  the problems, in the model's prompt style:
                       RL training and in-training validation sets, and the evaluation problems — the task's
                       validation split at ``eval.data_seed`` minus every problem of the RL training set, the SFT
                       data and the ``eval.exclude_data_seeds`` splits (never trained on, not the development set)
3. ``runs/<mode>-s<seed>/``  one torchrun per (mode, seed), ``parallel_runs`` at a time: ``train_config`` +
                       ``train_overrides`` + the mode's overrides + train.seed=<seed> + the paths; done once
                       ``hf_final/config.json`` exists
4. ``passk/``          tools/eval_passk.py: base + every final model on heldout.jsonl (resumable itself); with
                       ``eval.secondary`` the same again at other sampling settings into ``passk_<name>/``
4b. ``room/<model>/``   with a ``room`` section ({args: [tools/simko_room.py options]}): the room report
                       (eval/room.py) on the base and on each mode's first-seed final model — the room before and
                       after RL
5. ``figures/``, ``table.md``  eval/plots.py; pass@k mean ± std over seeds per mode (results.group_table), one
                       section per evaluation (``figures_<name>/passk.png`` for the secondary one)

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

from .results import (format_group_table, format_model_table, group_table, read_passk_csv, read_per_problem_csv,
                      write_json_atomic, write_text_atomic)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP_KEYS = ("out_dir", "task", "model", "train_config", "train_overrides", "nproc", "threads", "parallel_runs",
            "modes", "eval", "room", "variants")
TASK_KEYS = ("name", "config", "prompt_style", "train_size", "train_seed", "validation_size")
EVAL_KEYS = ("size", "data_seed", "exclude_data_seeds", "n", "samples_per_round", "protocol", "temperature", "top_p",
             "max_tokens", "seed", "table_ks", "secondary", "paired_reference")
SECONDARY_KEYS = ("name", "protocol", "temperature", "top_p")  # eval.secondary: the same models and problems, other
                                                                  # sampling; written to passk_<name>, figures_<name>


def study_table(rows, table, ks, ablations, size: int, n: int) -> str:
    """table.md: the main comparison (mean ± std over seeds per mode), the modes flagged ``ablation: true`` in a
    table of their own, then every model (every seed) on its own line."""
    main = [e for e in table if e["group"] not in ablations]
    extra = [e for e in table if e["group"] in ablations]
    text = (f"pass@k on {size} held-out problems, n = {n} samples each, mean ± std over seeds (sample std; 0 for "
            f"one seed)\n\n{format_group_table(main, ks)}\n\n")
    if extra:
        text += f"Ablation (labelled; not part of the main comparison):\n\n{format_group_table(extra, ks)}\n\n"
    return text + f"Every model:\n\n{format_model_table(rows, 'heldout', ks)}\n"


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
            if key in ("task", "model", "eval") and isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
    if out_dir:
        cfg["out_dir"] = out_dir
    for key in ("out_dir", "task", "model", "train_config", "modes", "eval"):
        if key not in cfg:
            raise StudyError(f"{path}: missing key {key!r}")
    for section, valid in (("eval", EVAL_KEYS), ("task", TASK_KEYS)):
        bad = sorted(set(cfg[section]) - set(valid))
        if bad:
            raise StudyError(f"{path}: unknown {section} key(s) {bad}; valid: {list(valid)}")
    second = cfg["eval"].get("secondary")
    if second is not None and (not isinstance(second, dict) or set(second) - set(SECONDARY_KEYS)
                               or not str(second.get("name", "")).replace("_", "").isalnum()):
        raise StudyError(f"{path}: eval.secondary must be {{name: <letters/digits>, protocol / temperature / top_p}}")
    missing = [k for k in TASK_KEYS if k not in cfg["task"]]
    if missing:
        raise StudyError(f"{path}: task needs {missing}")
    if set(cfg["model"]) & {"task", "task_config", "prompt_style"}:
        raise StudyError(f"{path}: the model's task comes from the task section; remove it from model")
    if not isinstance(cfg["modes"], dict) or not cfg["modes"]:
        raise StudyError(f"{path}: modes must map a mode name to {{seeds: [...], overrides: [...]}}")
    for mode, spec in cfg["modes"].items():
        if not isinstance(spec, dict) or not spec.get("seeds") or set(spec) - {"seeds", "overrides", "ablation"}:
            raise StudyError(f"{path}: modes.{mode} must be {{seeds: [..], overrides: [..]}} (optionally "
                             f"ablation: true, reported in its own table)")
        if not str(mode).replace("_", "").isalnum():
            raise StudyError(f"{path}: mode name {mode!r}: letters, digits and '_' only")
    room = cfg.get("room")
    if room is not None and (not isinstance(room, dict) or set(room) - {"args"}
                             or not all(isinstance(a, str) for a in room.get("args", []))):
        raise StudyError(f"{path}: room must be {{args: [tools/simko_room.py options as strings]}} or null")
    cfg.setdefault("train_overrides", [])
    cfg.setdefault("nproc", 1)
    cfg.setdefault("threads", 1)
    cfg.setdefault("parallel_runs", 1)
    cfg["variant"] = variant
    return cfg


def run_names(cfg: dict) -> list[tuple[str, str, int]]:
    """(run name, mode, seed) in config order: "<mode>-s<seed>"."""
    return [(f"{mode}-s{seed}", mode, int(seed)) for mode, spec in cfg["modes"].items() for seed in spec["seeds"]]


def train_overrides(cfg: dict, mode: str, seed: int, out: str) -> list[str]:
    """Everything a run gets on top of train_config: shared overrides, the mode's own, seed, paths."""
    return [*cfg["train_overrides"], *cfg["modes"][mode].get("overrides", []), f"train.seed={seed}",
            f"model.hf_dir={os.path.join(out, 'model')}",
            f"train.log_dir={os.path.join(out, 'runs', f'{mode}-s{seed}')}",
            f"data.train={os.path.join(out, 'data', 'train.jsonl')}",
            f"data.validation={os.path.join(out, 'data', 'validation.jsonl')}"]


# ------------------------------------------------------------------------------------------------ steps
class Study:
    def __init__(self, cfg: dict, config_path: str, log=print):
        self.cfg, self.config_path, self.log = cfg, config_path, log
        self.out = os.path.abspath(cfg["out_dir"])
        self.model_dir = os.path.join(self.out, "model")
        self.heldout = os.path.join(self.out, "heldout.jsonl")
        self.data_dir = os.path.join(self.out, "data")
        self.passk_dir = os.path.join(self.out, "passk")
        self.record: dict[str, Any] = {"config": cfg, "config_file": config_path, "commands": [], "seconds": {}}
        self.earlier: list = []  # the records of earlier invocations on this folder (a resumed study)
        path = os.path.join(self.out, "study.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            self.earlier = old.get("earlier", []) + [{k: v for k, v in old.items() if k != "earlier"}]
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
        write_json_atomic(os.path.join(self.out, "study.json"), {**self.record, "earlier": self.earlier})

    def _start(self, cmd: list[str], log_path: str) -> subprocess.Popen:
        self.record["commands"].append(shlex.join(cmd))
        self.log(f"$ {shlex.join(cmd)}  (log: {os.path.relpath(log_path)})")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)

    def _run(self, cmd: list[str], log_path: str, what: str) -> None:
        self._check(self._start(cmd, log_path).wait(), log_path, what)

    def _check(self, returncode: int, log_path: str, what: str) -> None:
        if returncode != 0:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = [ln.rstrip() for ln in f.readlines()[-40:] if ln.strip()]
            for ln in tail[-15:]:
                self.log(f"  | {ln}")
            raise StudyError(f"{what} failed (exit {returncode}); full log: {log_path}")

    # 1
    def make_model(self) -> None:
        if os.path.isfile(os.path.join(self.model_dir, "config.json")):
            self.log(f"== model: {self.model_dir} exists, kept")
            return
        t = self.cfg["task"]
        m = {"threads": self.cfg["threads"], "task": t["name"], "task_config": t["config"],
             "prompt_style": t["prompt_style"], **self.cfg["model"]}
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--out-dir", self.model_dir,
               "--force"]
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
    def make_data(self) -> None:
        """data/train.jsonl (RL training problems), data/validation.jsonl (in-training validation) and
        heldout.jsonl, all in the model's prompt style; held-out = never trained on (RL or SFT), not dev."""
        from ..data import load_prompts, write_prompt_jsonl
        from ..data.procedural import heldout_prompts
        from ..models.tiny import restyle

        if os.path.isfile(self.heldout):
            self.log(f"== problems: {self.heldout} exists, kept")
            return
        t, e = self.cfg["task"], self.cfg["eval"]
        with open(os.path.join(self.model_dir, "tiny_model.json"), encoding="utf-8") as f:
            made = json.load(f)
        if (made["task"], made["reasoning_gym_config"], made.get("prompt_style", "task")) != (
                t["name"], t["config"], t["prompt_style"]):
            raise StudyError(f"{self.model_dir} was warm-started on {made['task']} {made['reasoning_gym_config']} "
                             f"({made.get('prompt_style', 'task')} prompts), the study's task differs; delete the "
                             f"folder")
        source = f"reasoning_gym/{t['name']}"
        train = load_prompts(source, "train", size=t["train_size"], seed=t["train_seed"], **t["config"])
        val = load_prompts(source, "validation", size=t["validation_size"], seed=t["train_seed"], **t["config"])
        exclude = [train]
        if made.get("sft"):  # the problems the SFT drew (all of its data if the folder does not say)
            sft = load_prompts(source, "train", size=made["sft"]["train_problems"], seed=made["seed"], **t["config"])
            seen = made["sft"].get("seen_problems")
            exclude.append(sft if seen is None else [sft[i] for i in seen])
        exclude += [load_prompts(source, "validation", size=e["size"], seed=s, **t["config"])
                    for s in e.get("exclude_data_seeds", [])]
        held = heldout_prompts(t["name"], e["size"], e["data_seed"], exclude, **t["config"])
        style = lambda exs: [restyle(ex, t["name"], t["prompt_style"]) for ex in exs]  # noqa: E731
        os.makedirs(self.data_dir, exist_ok=True)
        write_prompt_jsonl(os.path.join(self.data_dir, "train.jsonl"), style(train))
        write_prompt_jsonl(os.path.join(self.data_dir, "validation.jsonl"), style(val))
        write_prompt_jsonl(self.heldout, style(held))  # last: its presence marks the step done
        self.log(f"== problems: {len(train)} training, {len(val)} validation, {len(held)} held out (none of the "
                 f"{sum(len(x) for x in exclude)} training / SFT / development problems)")

    # 3
    def train_all(self) -> None:
        """Every unfinished run, `parallel_runs` at a time (independent processes: one per core on a CPU box)."""
        todo = []
        for name, mode, seed in run_names(self.cfg):
            run_dir = os.path.join(self.out, "runs", name)
            if os.path.isfile(os.path.join(run_dir, "hf_final", "config.json")):
                self.log(f"== train {name}: finished, kept")
                continue
            overrides = train_overrides(self.cfg, mode, seed, self.out)
            self._train_config(overrides[len(self.cfg["train_overrides"]):])  # a bad override fails here, not later
            todo.append((name, run_dir, overrides))
        running: dict = {}  # name -> (process, log path, start time)
        failed = None
        while todo or running:
            while todo and len(running) < self.cfg["parallel_runs"] and failed is None:
                name, run_dir, overrides = todo.pop(0)
                cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node",
                       str(self.cfg["nproc"]), "--master-port", str(free_port()), "-m", "megatron_simko.train",
                       "--config", self.cfg["train_config"], *overrides]
                self.log(f"== train {name}")
                log_path = os.path.join(run_dir, "train.log")
                running[name] = (self._start(cmd, log_path), log_path, time.perf_counter())
            if failed is not None and not running:
                break
            time.sleep(1.0)
            for name, (proc, log_path, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0 and failed is None:
                    failed = (proc.returncode, log_path, f"training {name}")  # let the others finish, start none
                elif proc.returncode == 0:
                    self.record.setdefault("train_seconds", {})[name] = round(time.perf_counter() - t0, 1)
                    self.log(f"== train {name}: done in {time.perf_counter() - t0:.0f} s")
                    self._save_record()
        if failed is not None:
            self._check(*failed)

    # 4
    def evaluations(self) -> list[tuple[str, str, dict]]:
        """(label, folder suffix, sampling) of the primary evaluation and of ``eval.secondary`` if given."""
        e = self.cfg["eval"]
        out = [("primary", "", {k: e[k] for k in ("protocol", "temperature", "top_p") if k in e})]
        if e.get("secondary"):
            second = dict(e["secondary"])
            out.append((f"secondary ({second['name']})", f"_{second.pop('name')}", second))
        return out

    def evaluate(self) -> None:
        e = self.cfg["eval"]
        for label, suffix, sampling in self.evaluations():
            cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_passk.py"), "--model", f"base={self.model_dir}"]
            for name, _, _ in run_names(self.cfg):
                cmd += ["--model", f"{name}={os.path.join(self.out, 'runs', name, 'hf_final')}"]
            cmd += ["--data", f"heldout={self.heldout}", "--n", str(e["n"]), "--out-dir", self.passk_dir + suffix,
                    "--samples-per-round", str(e.get("samples_per_round", 64)), "--max-tokens", str(e["max_tokens"]),
                    "--seed", str(e.get("seed", 0)), "--no-progress"]
            if sampling.get("protocol"):
                cmd += ["--protocol", sampling["protocol"]]
            for key in ("temperature", "top_p"):
                if key in sampling:
                    cmd += [f"--{key.replace('_', '-')}", str(sampling[key])]
            self.log(f"== pass@k evaluation, {label} (resumes what is on disk)")
            self._run(cmd, os.path.join(self.out, "logs", f"eval{suffix}.log"), f"the {label} pass@k evaluation")

    # 4b
    def room_targets(self) -> list[tuple[str, str]]:
        """(name, model folder): the base, then each mode's first-seed final model."""
        return [("base", self.model_dir)] + [
            (f"{mode}-s{spec['seeds'][0]}", os.path.join(self.out, "runs", f"{mode}-s{spec['seeds'][0]}", "hf_final"))
            for mode, spec in self.cfg["modes"].items()]

    def room(self) -> None:
        if not self.cfg.get("room"):
            return
        t = self.cfg["task"]
        for name, model in self.room_targets():
            out = os.path.join(self.out, "room", name)
            if os.path.isfile(os.path.join(out, "room.json")):
                continue
            cmd = [sys.executable, os.path.join(ROOT, "tools", "simko_room.py"), "--model", model, "--data",
                   f"reasoning_gym/{t['name']}", "--task-config", json.dumps(t["config"]), "--out-dir", out,
                   *self.cfg["room"].get("args", [])]
            self.log(f"== room report: {name}")
            self._run(cmd, os.path.join(self.out, "logs", f"room_{name}.log"), f"the room report of {name}")

    def room_table(self) -> str:
        """The room numbers before (base) and after RL (each mode's first seed), if the room step ran."""
        lines = ["| model | gated/response | decision share | gated entropy | p_2 + p_3 | valid candidates | "
                 "F | predicted deviation | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        for name, _ in self.room_targets():
            path = os.path.join(self.out, "room", name, "room.json")
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as fh:
                rec = json.load(fh)
            m = rec["metrics"]
            lines.append(f"| {name} | {f(m['gated_per_response'])} | {f(m['decision_share'])} | "
                         f"{f(m['mean_gated_entropy'])} | {f(m['mean_p2_plus_p3'])} | "
                         f"{f(m['mean_valid_candidates'])} | "
                         f"{f(m['gated_forks_per_response'])} | {f(m['predicted_deviation'])} | "
                         f"{rec['verdict'].split(':')[0]} |")
        head = "## Room (tools/simko_room.py; room/<model>/room.md)\n\n"
        return "" if len(lines) == 2 else head + "\n".join(lines) + "\n"

    # 5
    def report(self) -> None:
        from .plots import make_figures

        runs = [os.path.join(self.out, "runs", name) for name, _, _ in run_names(self.cfg)]
        e = self.cfg["eval"]
        ks = [k for k in e.get("table_ks", [1, 8, 64, 256]) if k <= e["n"]]
        ablations = {mode for mode, spec in self.cfg["modes"].items() if spec.get("ablation")}
        texts = []
        for label, suffix, sampling in self.evaluations():
            for path in make_figures(os.path.join(self.out, "figures" + suffix), self.passk_dir + suffix,
                                     runs if not suffix else ()):
                self.log(f"== figure {path}")
            rows = read_passk_csv(os.path.join(self.passk_dir + suffix, "passk.csv"))
            table = group_table(rows, "heldout", ks)
            texts.append(f"## {label.capitalize()} evaluation: {json.dumps(sampling)}\n\n"
                         + study_table(rows, table, ks, ablations, e["size"], e["n"]))
            if e.get("paired_reference"):
                texts.append(self.paired_table(self.passk_dir + suffix, e["paired_reference"], ks))
            self.record["table" + suffix] = [{**{k: v for k, v in t.items() if not isinstance(k, int)},
                                              **{f"pass@{k}": t[k] for k in ks if k in t}} for t in table]
        text = "\n".join(texts + ([self.room_table()] if self.cfg.get("room") else []))
        write_text_atomic(os.path.join(self.out, "table.md"), text)
        self.log(text)

    def paired_table(self, passk_dir: str, reference: str, ks: list[int]) -> str:
        """Paired differences against ``eval.paired_reference`` (eval/paired.py), seed by seed."""
        from .paired import format_paired_table, paired_differences

        per_problem = read_per_problem_csv(os.path.join(passk_dir, "per_problem.csv"))
        rows = paired_differences(per_problem, reference, ks)
        return (f"Paired differences, arm − {reference} on the same seed (mean over problems; 95% bootstrap band "
                f"over problems):\n\n{format_paired_table(rows, ks, reference)}\n")

    def run(self) -> dict:
        os.makedirs(self.out, exist_ok=True)
        t0 = time.perf_counter()
        self._timed("model", self.make_model)
        self._timed("data", self.make_data)
        self._timed("train", self.train_all)
        self._timed("eval", self.evaluate)
        self._timed("room", self.room)
        self._timed("report", self.report)
        self.record["seconds"]["total_this_invocation"] = round(time.perf_counter() - t0, 1)
        self._save_record()
        return self.record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 prog="python -m megatron_simko.eval.study", description=__doc__.split("\n")[0])
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

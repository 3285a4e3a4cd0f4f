"""What every run folder records so that its numbers can be traced and repeated."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: harness.report needs git_commit only
    import torch

PACKAGES = ("torch", "torchvision", "pytorch-metric-learning", "optuna", "faiss-cpu", "faiss-gpu",
            "numpy", "pandas", "scipy", "pillow", "matplotlib")
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> dict:
    """Commit hash and whether the work tree had uncommitted changes (results from a dirty tree
    cannot be repeated exactly from the commit alone)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": dirty}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# The libraries whose version changes what a run computes: between torch 2.11 and 2.14,
# torch.clamp's gradient at its bound went from 1 to 0, and SoftTriple trials that diverged
# under one trained on under the other (docs/embedded.md). Runs that mix them are called out.
NUMERIC_PACKAGES = ("torch", "pytorch-metric-learning")


def release(versions: dict, name: str) -> str:
    """The release of package `name` in a provenance record's versions ('?' if unrecorded). A
    local build label (torch's '+cu130', '+cpu') is left out: the same release computes the
    same on the CPU whichever build it is."""
    return str(versions.get(name, "?")).split("+")[0]


def numeric_versions(versions: dict) -> str:
    """'torch 2.14.1, pytorch-metric-learning 2.9.0' from a provenance record's versions."""
    return ", ".join(f"{name} {release(versions, name)}" for name in NUMERIC_PACKAGES)


def recorded_numeric_versions(invocations) -> list[str]:
    """The distinct numeric_versions of a provenance.json's invocations, in order of first use
    (entries without versions, or not records at all, are skipped: the file is untrusted)."""
    seen: list[str] = []
    for inv in invocations if isinstance(invocations, list) else []:
        versions = inv.get("versions") if isinstance(inv, dict) else None
        if isinstance(versions, dict) and numeric_versions(versions) not in seen:
            seen.append(numeric_versions(versions))
    return seen


# torch.clamp's gradient at its bound: 0 in this release (measured; pytorch/pytorch#184574,
# #191142), 1 in 2.11 (measured); the releases between were not measured, so they count as
# unknown. What SoftTriple's center regulariser computed before `train.center_collapse_gradient`
# existed came from it (losses/sparse_centers_regularizer.py).
CLAMP_GRADIENT_ZERO_FROM = (2, 14, 1)


def older_center_collapse_gradient(invocations) -> str | None:
    """What a run folder written before `train.center_collapse_gradient` existed computed at an
    exactly collapsed pair of SoftTriple centers: "zero" when every invocation in its
    provenance.json ran a torch release from CLAMP_GRADIENT_ZERO_FROM on (the clamp's gradient
    then, and the harness's own 0 since efd7f24); None when any ran an older, pre-release or
    unrecorded torch (its clamp may have passed the gradient on): unknown."""
    if not isinstance(invocations, list) or not invocations:
        return None
    for inv in invocations:
        versions = inv.get("versions") if isinstance(inv, dict) else None
        parts = release(versions, "torch").split(".") if isinstance(versions, dict) else []
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None  # unrecorded, or a pre-release such as 2.14.0a0
        if tuple(int(p) for p in parts) < CLAMP_GRADIENT_ZERO_FROM:
            return None
    return "zero"


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux; else what platform knows, or ""). Worth
    recording: the last bits of a CPU run, and so the glyph trunk's weights, differ from one
    processor to another (docs/embedded.md)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def hardware(device: torch.device | None = None) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_model": cpu_model(),
            # the vector instructions torch's CPU kernels use (AVX2, AVX512, ...)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes: names exactly which weight file a run started from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensors_sha256(path: Path) -> str:
    """Hex SHA-256 of a weight file's tensors (names, dtypes, shapes, bytes), not of its bytes:
    two files that torch.save wrote differently (another serialisation, another zip layout)
    but that load to the same weights get the same hash. WeightsError for a file that is not a
    state dict of tensors."""
    import torch

    from harness.errors import WeightsError
    from harness.models import read_state_dict

    digest = hashlib.sha256()
    try:
        for name, tensor in sorted(read_state_dict(Path(path)).items(), key=lambda kv: str(kv[0])):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}\n{flat.dtype}\n{tuple(tensor.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError, ValueError) as e:  # sparse, quantised or odd tensors
        raise WeightsError(f"{path}: its tensors cannot be hashed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); a trunk's weight "
                           f"file holds dense tensors") from None
    return digest.hexdigest()


def same_trunk(earlier: dict, now: dict) -> bool:
    """Whether two provenance records of a trunk weight file ({"sha256", "tensors_sha256"})
    name the same weights: by their tensors where both record them, else by the file's bytes
    (records written before tensors_sha256 existed)."""
    if earlier.get("tensors_sha256") and now.get("tensors_sha256"):
        return earlier["tensors_sha256"] == now["tensors_sha256"]
    return earlier.get("sha256") == now.get("sha256")


def redact_word(word: str) -> str:
    """One command-line word or value with any URL password replaced by *** (run folders may
    sit on shared disks): `postgresql://u:pw@h/db` and `--storage=postgresql://u:pw@h/db`."""
    from harness.storage import redact_url  # local import: storage loads optuna and SQLAlchemy

    if "://" not in word:
        return word
    flag, sep, value = word.partition("=")
    if sep and "://" not in flag:  # --storage=URL
        return f"{flag}={redact_url(value)}"
    return redact_url(word)


def redact(obj):
    """`obj` (str, or lists and dicts of them) with every URL password replaced by ***."""
    if isinstance(obj, str):
        return redact_word(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def provenance(device: torch.device | None = None, **extra) -> dict:
    """One invocation's record; passwords in URLs (the --storage of a PostgreSQL study) are
    replaced by *** in the command line and in `extra`."""
    command = " ".join([Path(sys.executable).name] + [redact_word(w) for w in sys.argv])
    return {"time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "git": git_commit(), "versions": library_versions(),
            "hardware": hardware(device), **redact(extra)}

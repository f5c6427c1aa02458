"""soft_rl/ is pure algorithm and library code: it never imports ray or vllm."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "vllm", "deepspeed"}


def test_soft_rl_sources_do_not_import_ray_vllm_or_deepspeed():
    offenders = []
    for path in (ROOT / "soft_rl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_importing_every_soft_rl_module_loads_no_ray_or_vllm():
    modules = [f"soft_rl.{p.stem}" for p in (ROOT / "soft_rl").glob("*.py") if p.stem != "__init__"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'vllm', 'deepspeed'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_vllm_internals_only_in_the_engine_module():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", ".cache") or rel.parts[:2] == ("workers", "vllm_soft"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm."):
                offenders.append(f"{rel}: {node.module}")
    assert not offenders


def test_nothing_tracked_refers_to_a_path_outside_the_repository():
    """A user's clone has nothing beside it: no tracked file may read ../<something> or a shared/ folder
    next to the repository (data, presets and tests use the copies inside it)."""
    import re

    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    outside = re.compile(r"\.\./(shared|data)|(?<![\w/])shared/(design|data)|/work/")
    parents = re.compile(r"parents\[(\d+)\]")
    offenders = []
    for rel in files:
        path = ROOT / rel
        if path.suffix not in {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".cfg", ".txt", ".sbatch", ""} or \
                not path.is_file() or rel == "tests/test_layout.py":
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            # a file n folders deep reaches the repository root with parents[n]; more is outside
            if outside.search(line) or any(int(m) >= len(Path(rel).parts) for m in parents.findall(line)):
                offenders.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)

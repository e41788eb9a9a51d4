"""The README's "Using it from TorchRec" snippet is working code.

It is ``examples/torchrec_quickstart.py`` (between its README markers): these
tests check that the README's block is that text, that it imports ESD from the
top-level package only, that the package's public surface resolves, and run the
example under torchrun (2 workers + 1 PS, gloo on localhost).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrec_quickstart.py"
BEGIN = "# ---- README: Using it from TorchRec (begin)\n"
END = "# ---- README: Using it from TorchRec (end)\n"


def _example_section() -> str:
    text = EXAMPLE.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def _readme_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it from TorchRec\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```\n", section, flags=re.S)
    assert len(blocks) == 1, "the section has one python block: the example"
    return blocks[0]


def test_readme_snippet_is_the_example_file():
    assert _readme_block() == _example_section()


def test_readme_snippet_is_self_contained():
    # every global name its functions read is defined by the snippet itself (or a builtin)
    import builtins
    import dis
    import types

    namespace: dict = {}
    exec(compile(_readme_block(), "README snippet", "exec"), namespace)
    functions = [v for v in namespace.values()
                 if isinstance(v, types.FunctionType) and v.__code__.co_filename == "README snippet"]
    assert {f.__name__ for f in functions} >= {"build_dlrm", "train"}
    for f in functions:
        for ins in dis.get_instructions(f):
            if ins.opname == "LOAD_GLOBAL":
                assert ins.argval in namespace or hasattr(builtins, ins.argval), (f.__name__, ins.argval)


def test_readme_snippet_imports_esd_from_the_top_level_package_only():
    imports = [ln for ln in _readme_block().splitlines() if re.match(r"\s*(from|import)\s", ln)]
    esd = [ln for ln in imports if "torchrec_esd" in ln]
    assert esd and all(ln.startswith("from torchrec_esd import ") for ln in esd), esd


def test_public_api_is_light_and_complete():
    code = (
        "import sys, torchrec_esd\n"
        "heavy = [m for m in ('torchrec', 'torchrec_esd.distributed.sharding', 'torchrec_esd.ops') if m in sys.modules]\n"
        "print(torchrec_esd.__all__)\n"
        "print(heavy)\n"
        "missing = [n for n in torchrec_esd.__all__ if getattr(torchrec_esd, n, None) is None]\n"
        "from torchrec_esd import *\n"
        "from torchrec_esd import reference_ops\n"  # a submodule that is not in __all__ still imports
        "print(missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names, heavy, missing = out.stdout.strip().splitlines()[-3:]
    for name in ("EsdConfig", "WorkerSpec", "EsdRuntime", "EsdInputDist", "EsdEmbeddingBagCollectionSharder",
                 "esd_module_plan", "EsdShardingPlanner", "make_dispatcher", "SparseOptimizer",
                 "EsdConfigError", "EsdRemoteError"):
        assert repr(name) in names
    assert heavy == "[]", f"import torchrec_esd loaded {heavy}"
    assert missing == "[]"
    # every name the README's snippet takes from torchrec_esd is exported
    block = _readme_block()
    imported = re.search(r"from torchrec_esd import \((.*?)\)", block, flags=re.S).group(1)
    for name in re.findall(r"\w+", imported):
        assert repr(name) in names, name


def test_example_trains_under_torchrun_with_two_workers_and_one_ps():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(EXAMPLE), "--steps", "4", "--batch", "16"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    for rank in (0, 1):
        assert f"worker {rank}: trained 4 steps" in out.stdout, log[-5000:]
    assert "parameter server 2: served until the workers stopped" in out.stdout

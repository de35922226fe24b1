"""Every python block in README.md runs as written, pasted into a file: plain blocks with python, blocks
whose first line is `# torchrun --nproc-per-node N this.py` under torchrun with N processes (gloo, CPU).
Each runs in a fresh process in an empty folder, and must print no warning."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = re.compile(r"#\s*torchrun --nproc-per-node (\d+) this\.py")


def _blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


BLOCKS = _blocks()


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5 and sum(bool(TORCHRUN.match(b)) for b in BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: BLOCKS[i].splitlines()[0][:40])
def test_readme_block_runs_as_written(index, tmp_path):
    code = BLOCKS[index]
    (tmp_path / "this.py").write_text(code)
    launch = TORCHRUN.match(code)
    command = [sys.executable, "this.py"]
    if launch:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", launch.group(1),
                   "--master-port", str(29400 + index), "this.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    warnings = [line for line in done.stderr.splitlines() if "Warning" in line]
    assert not warnings, warnings

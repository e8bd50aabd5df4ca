"""The README's embedding example runs as written.

The test takes the README's one ``python`` code block, writes it to a file outside
the repository and runs it in a fresh interpreter: it must start the association
server on 127.0.0.1, have a real peer (pynetdicom) store an image through the
handler it binds, and stop by itself with exit status 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: the example stops by itself in about a second; this only bounds a broken one
TIMEOUT = 120


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def test_readme_has_one_python_example() -> None:
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 1, "the README's embedding example is its only python block"
    assert "AssociationServer" in blocks[0]


def test_readme_embedding_example_runs(tmp_path: Path) -> None:
    (example,) = python_blocks((REPO / "README.md").read_text())
    script = tmp_path / "example.py"
    script.write_text(example)
    env = dict(os.environ)
    # as a user's program would: the package importable, run from elsewhere
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "C-STORE from EXAMPLE patient Doe^Jane" in done.stdout, done.stdout
    assert "status 0x0000" in done.stdout, done.stdout

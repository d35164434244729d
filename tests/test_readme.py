"""README's Python snippets run as written (in a temp folder, so their run directories stay out of the tree)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_each_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if "use_devices" in SNIPPETS[index]:   # sets devices before TensorFlow starts: needs a process of its own
        script = tmp_path / "snippet.py"
        script.write_text(SNIPPETS[index])
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(README.parent)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "replicas and one device agree" in done.stdout and "replica spread 0.0" in done.stdout, done.stdout
        return
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet printed nothing"
    if index == 0:
        assert "pre-flight: compiled and eager agree" in printed and "compiled and eager agree" in printed.splitlines()[-1]
    assert not os.path.exists(pathlib.Path(README).parent / "profiles" / "gan-readme")

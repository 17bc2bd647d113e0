"""The README's quickstart runs as written (after the demo, as the README says) and shows memory at work."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written_and_the_memory_changes_the_answer(tmp_path, monkeypatch, demo_output):
    text = README.read_text()
    quickstart = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    (tmp_path / "demo_output").symlink_to(demo_output[0])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    tok = namespace["tok"]
    assert tok.decode(namespace["answer"][0, -1]) == "teal"  # recalled from memory
    assert tok.decode(namespace["no_memory"][0, -1]) != "teal"  # without the memory the fact is gone
    assert Path(namespace["path"]).is_file() and not (tmp_path / "session.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_output"]  # the quickstart writes nothing here

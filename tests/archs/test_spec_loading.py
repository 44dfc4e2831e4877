"""Loading the built-in specs (`rotfuse.archs.spec.builtin_specs`): every checkpoint opened asks
for all of them, so they are parsed once per version of the files -- and read again once a file
changes."""

from __future__ import annotations

import shutil
from pathlib import Path

from rotfuse.archs import spec
from rotfuse.archs.spec import builtin_spec_dir, builtin_specs


def test_builtin_specs_are_parsed_once_per_version_of_the_files(monkeypatch, tmp_path: Path):
    folder = tmp_path / "archs"
    shutil.copytree(builtin_spec_dir(), folder)
    monkeypatch.setattr(spec, "builtin_spec_dir", lambda: folder)
    loaded: list[str] = []
    load = spec.load_spec_file
    monkeypatch.setattr(spec, "load_spec_file", lambda path: loaded.append(Path(path).name) or load(path))

    first = builtin_specs()
    assert sorted(loaded) == sorted(p.name for p in folder.glob("*.yaml"))
    loaded.clear()
    second = builtin_specs()
    assert not loaded and second == first and all(second[name] is first[name] for name in first)

    gpt2 = folder / "gpt2.yaml"
    gpt2.write_text(gpt2.read_text().replace("name: gpt2", "name: gpt2-edited", 1))
    third = builtin_specs()
    assert loaded and "gpt2-edited" in third and "gpt2" not in third
    assert third["llama"] == first["llama"]

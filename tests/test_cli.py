"""The `mltag` command: every stage is listed, `mltag --help` imports no heavy library, and each
stage's help line is its config's own docstring."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mltag.cli import STAGES, _resolve, build_parser


def test_top_level_help_lists_every_stage_without_importing_heavy_libraries():
    code = (
        "import sys\nfrom mltag.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'timm', 'ray', 'faiss', 'deltalake', 'pyarrow') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for name in STAGES:
        assert name in out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_help_is_its_config_docstring_and_its_entry_point_resolves(name):
    stage = STAGES[name]
    config_cls = _resolve(stage.config)
    assert stage.help == (config_cls.__doc__ or "").strip().splitlines()[0]
    assert callable(_resolve(stage.run))
    parser = build_parser(name)
    assert parser.parse_args([name]).stage == name


def test_every_stage_help_imports_neither_torch_nor_timm():
    # `mltag tag --help` once took 12 s: the stage modules imported the model (timm, torch) at the
    # top. Configs and run planning stay light; the network loads where it runs.
    code = (
        "import sys\nfrom mltag.cli import STAGES, main\n"
        "for name in STAGES:\n"
        "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert out.count("usage: mltag") == len(STAGES)


def test_an_input_to_fix_is_one_line_naming_it_and_exit_2_not_a_traceback(tmp_path, tiny_catalog, capsys):
    from mltag.cli import main

    missing = str(tmp_path / "missing.parquet")
    assert main(["train", "--manifest", missing, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mltag train: manifest not found: {missing}"
    broken = tmp_path / "vocabulary.yaml"
    broken.write_text("tags: [a, b\n")  # unclosed list
    args = ["train", "--manifest", tiny_catalog["manifest"], "--vocabulary", str(broken), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mltag train: ") and str(broken) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_a_missing_or_modified_model_stops_tagging_before_ray_starts(tmp_path, tiny_catalog, tiny_model_dir, capsys):
    """The driver checks the model's weights against its version before any work: one line, exit
    2, no Ray started (a tampered file once failed in every actor, as a Ray traceback)."""
    import shutil

    import ray

    from mltag.cli import main

    was_running = ray.is_initialized()
    missing = str(tmp_path / "no-model")
    args = ["tag", "--manifest", tiny_catalog["manifest"], "--out", str(tmp_path / "table"), "--model"]
    assert main([*args, missing]) == 2
    assert capsys.readouterr().err.strip() == f"mltag tag: no trained tagger at {missing} (missing tagger.json)"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "weights.pt").write_bytes((broken / "weights.pt").read_bytes()[:-8] + bytes(8))
    assert main([*args, str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mltag tag: refusing to load the tagger at {broken}: weights.pt and tagger.json do not match")
    assert "\n" not in err and ray.is_initialized() == was_running and not (tmp_path / "table").exists()

"""The seams between the stages and the engine (issue 24 items 2 and 3): one vocabulary, stage
helpers below the stages, a typed engine whose stages talk through typed record fields."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest

import embbench
from embbench import analysis, cells, models, records
from embbench.cells import Cell, Produced, StageSteps
from embbench.records import ResultRecord, ResultStore, migrate_record, parse_record

PKG = Path(embbench.__file__).parent
OLD_RECORDS = Path(__file__).parent / "data" / "records_v1"


def test_one_vocabulary_everything_imports():
    from embbench import vocab

    assert typing.get_args(vocab.Mode) == vocab.MODES
    assert typing.get_args(vocab.WeightMode) == vocab.WEIGHT_MODES
    assert typing.get_args(vocab.Task) == vocab.TASKS
    assert set(vocab.RETRIEVAL_TASKS) | set(vocab.CLASSIFICATION_TASKS) == set(vocab.TASKS)
    assert set(vocab.TEXT_TASKS) | set(vocab.BASELINE_TASKS) | {"image-image"} == set(vocab.TASKS)
    # the same objects, not copies that can drift apart
    assert records.MODES is vocab.MODES and records.Mode is vocab.Mode
    assert analysis.MODES is vocab.MODES and analysis.TUNED_MODES is vocab.TUNED_MODES
    assert analysis.CROSS_MODES is vocab.CROSS_MODES
    assert models.WEIGHT_MODES is vocab.WEIGHT_MODES and models.RANDOM_SEED == vocab.RANDOM_SEED
    assert set(vocab.TUNED_MODES + vocab.CROSS_MODES) < set(vocab.MODES)
    # spelled once: no module but vocab.py assigns these names
    for path in PKG.rglob("*.py"):
        if path.name == "vocab.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            assert not names & {
                "MODES",
                "Mode",
                "WEIGHT_MODES",
                "RANDOM_SEED",
                "TUNED_MODES",
                "CROSS_MODES",
            }, f"{path.relative_to(PKG)} spells {names}"


def test_a_stage_imports_no_other_stage():
    """Stages 02-04 used stage 01 as their library; the shared helpers now sit below them."""
    stages = PKG / "stages"
    for path in stages.glob("*.py"):
        if path.name.startswith("_"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                names = [a.name for a in node.names]
                public = [n for n in names if not n.startswith("_")]
                own = ("_variants", path.stem)  # (finetune runs itself under torchrun)
                part = mod.split(".")[2] if mod.startswith("embbench.stages.") else None
                # a stage's own private pieces are _<stage>_*.py (e.g. _toptune_mlflow)
                mine = part in own or (part or "").startswith(f"_{path.stem}_")
                assert part is None or mine, f"{path.name} imports {mod}"
                assert not (mod == "embbench.stages" and public), f"{path.name} imports {names}"
    from embbench.stagekit import EmbedderPool, embed_options, lineage_of, weights_problem

    assert callable(embed_options) and callable(lineage_of) and isinstance(EmbedderPool, type)
    assert weights_problem("random") is None and "checkpoint" in weights_problem("randm")


def test_no_one_letter_module_aliases():
    for folder in ("stages", "analysis"):
        for path in [*(PKG / folder).rglob("*.py"), PKG / "cells.py"]:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    short = [a.asname for a in node.names if a.asname and len(a.asname) == 1]
                    assert not short, f"{path.relative_to(PKG)}: {short}"


def test_steps_base_class_has_a_no_op_expand_and_the_engine_calls_it():
    cell = Cell("embed", "pretrained", "test_resnet", "demo")
    assert StageSteps().expand([cell], {}) == [cell]
    assert StageSteps().check([cell], {}) == []
    src = (PKG / "cells.py").read_text()
    assert 'getattr(self.steps, "expand"' not in src
    from embbench.stages import crosstune, embed, finetune, toptune

    for steps in (
        embed.EmbedSteps,
        finetune.FinetuneSteps,
        toptune.TopTuneSteps,
        crosstune.CrosstuneSteps,
    ):
        assert issubclass(steps, StageSteps)


def test_produced_is_typed():
    hints = typing.get_type_hints(Produced)
    assert hints["spec"] is models.ModelSpec
    assert all(
        hints[f.name] is not typing.Any
        for f in dataclasses.fields(Produced)
        if f.name not in ("details",)
    ), hints
    assert "toptune_model_path" in hints and "searched_with" in hints


def test_cell_engine_reads_as_the_loop():
    tree = ast.parse((PKG / "cells.py").read_text())
    (engine,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CellEngine"]
    assert engine.end_lineno - engine.lineno + 1 <= 200
    for name in ("cells.py", "cells_validate.py", "records.py", "tracking_runs.py"):
        assert len((PKG / name).read_text().splitlines()) <= 500, name


def test_toptune_model_path_is_a_typed_record_field_and_older_records_move_it():
    # a version 2 record written before issue 24 kept it in details
    v1 = json.loads((OLD_RECORDS / "toptune-top-tuned-test_resnet.json").read_text())
    current = parse_record(v1)
    assert current.toptune_model_path == v1["toptune_model_path"]
    assert "toptune_model_path" not in current.details
    older_v2 = current.model_dump(mode="json")
    older_v2.pop("toptune_model_path")
    older_v2["details"] = {**older_v2["details"], "toptune_model_path": "/m/model.keras"}
    moved = migrate_record(older_v2)
    assert moved["toptune_model_path"] == "/m/model.keras"
    assert "toptune_model_path" not in moved["details"]
    assert "toptune_model_path" in older_v2["details"]  # the input is not changed
    assert ResultRecord.model_validate(moved).toptune_model_path == "/m/model.keras"
    cross = parse_record(
        json.loads((OLD_RECORDS / "crosstune-cross-top-tuned-test_resnet.json").read_text())
    )
    assert cross.toptune_model_path and "toptune_model_path" not in cross.details


def test_crosstune_finds_the_toptuned_source_by_its_typed_field(tmp_path):
    from embbench.stages.crosstune import CrosstuneConfig, CrosstuneSteps

    store = ResultStore(tmp_path / "results")
    raw = json.loads((OLD_RECORDS / "toptune-top-tuned-test_resnet.json").read_text())
    rec = parse_record(raw)
    store.save(rec, None)
    cfg = CrosstuneConfig(
        models=["test_resnet"],
        datasets=[rec.dataset],
        toptuned_on=[rec.dataset, "elsewhere"],
        skip_missing=True,
    )
    steps = CrosstuneSteps(cfg, store)
    src = steps._toptuned("test_resnet", rec.dataset)
    assert src is not None and src.toptune_model_path == rec.toptune_model_path
    no_path = rec.model_copy(update={"toptune_model_path": None, "config_hash": "other"})
    store2 = ResultStore(tmp_path / "results2")
    store2.save(no_path, None)
    assert CrosstuneSteps(cfg, store2)._toptuned("test_resnet", rec.dataset) is None


def test_the_record_backend_is_the_variant_engine_only_when_said():
    """``details["engine"]`` no longer changes the record's backend: ``searched_with`` does."""
    src = (PKG / "cells.py").read_text()
    assert 'details.get("engine"' not in src
    with pytest.raises(TypeError):
        Produced(query=None, index=None, lineage=None, spec=None, engine="faiss")  # type: ignore
    assert cells.Produced.__dataclass_fields__["searched_with"].default is None


def _local_package_imports(source: str) -> list[int]:
    """Lines of ``import embbench...`` / ``from embbench... import`` inside a function body."""
    lines = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                package = node.level > 0 or (node.module or "").split(".")[0] == "embbench"
            elif isinstance(node, ast.Import):
                package = any(a.name.split(".")[0] == "embbench" for a in node.names)
            else:
                continue
            if package:
                lines.append(node.lineno)
    return sorted(set(lines))


def test_function_local_package_imports_only_where_an_import_must_wait():
    """At most 12 outside the CLI (kfp component bodies, keras after its backend, torch)."""
    sample = "import os\ndef f():\n    from embbench.paths import runs_dir\n    import embbench.x\n"
    assert _local_package_imports(sample) == [3, 4]  # the counter sees both spellings
    found = {
        f"{path.relative_to(PKG)}:{line}": line
        for path in sorted(PKG.rglob("*.py"))
        if path.relative_to(PKG).as_posix() != "cli.py"
        for line in _local_package_imports(path.read_text())
    }
    assert len(found) <= 12, sorted(found)
    for where in found:  # each says why it waits, in a comment on it or the line above
        path, line = where.rsplit(":", 1)
        text = (PKG / path).read_text().splitlines()
        near = text[int(line) - 2] + text[int(line) - 1]
        assert "#" in near, f"{where}: say in a comment why this import waits"


def test_no_module_over_500_lines():
    lengths = {
        p.relative_to(PKG).as_posix(): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")
    }
    assert not {name: n for name, n in lengths.items() if n > 500}

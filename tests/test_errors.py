"""One ``UserError`` base: every user-fixable error derives from it and the CLI exits 2 on it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import embbench
from embbench._errors import UserError
from embbench.cli import _explain, main

# The classes the CLI listed as user-fixable before they shared a base (two lists in cli.py).
USER_FIXABLE = {
    "ConfigError",
    "GridError",
    "CellSelectError",
    "CatalogueError",
    "DatasetLayoutError",
    "FetchError",
    "CacheError",
    "CorruptCacheError",
    "CacheBusyError",
    "ServiceUnreachableError",
    "RecordError",
    "TrackingStoreError",
    "DiskFullError",
    "UnknownNameError",
    "DatasetParamsError",
    "ModelError",
    "WeightsUnavailableError",
    "CheckpointError",
    "PackageWeightsMissingError",
    "AnalysisError",
    "GalleryError",
    "TopTuneError",
    "FinetuneError",
    "ReportError",
    "BadImageError",
    "RetrievalPlanError",
    "StorageError",
}


def _error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in embbench whose name ends in ``Error``."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(embbench.__path__, "embbench."):
        if info.name.startswith("embbench.notebooks") or info.name == "embbench.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and name.endswith("Error")
                and obj.__module__.startswith("embbench")
            ):
                found[name] = obj
    return found


def test_every_user_fixable_error_derives_from_user_error():
    classes = _error_classes()
    assert set(classes) >= USER_FIXABLE, sorted(USER_FIXABLE - set(classes))
    not_user = sorted(n for n in USER_FIXABLE if not issubclass(classes[n], UserError))
    assert not not_user, f"not UserError subclasses: {not_user}"
    # the built-in bases stay, so `except ValueError` callers keep working
    assert issubclass(classes["ConfigError"], ValueError)
    assert issubclass(classes["DiskFullError"], OSError)
    assert issubclass(classes["UnknownNameError"], KeyError)


class PapermillExecutionError(Exception):
    """Stands in for papermill's: a notebook's exception known by class name only."""

    def __init__(self, ename: str) -> None:
        super().__init__(ename)
        self.ename, self.evalue, self.exec_count = ename, "the message", 3


@pytest.mark.parametrize("name", sorted(USER_FIXABLE | {"FileNotFoundError"}))
def test_a_notebook_user_error_is_status_2(name):
    assert _explain(PapermillExecutionError(name))[1] == 2


def test_a_notebook_bug_is_status_1():
    assert _explain(PapermillExecutionError("ZeroDivisionError"))[1] == 1


@pytest.mark.parametrize("name", ["GalleryError", "TopTuneError", "FinetuneError"])
def test_a_user_error_raised_in_process_exits_2(name, monkeypatch, capsys):
    cls = _error_classes()[name]
    monkeypatch.setattr("embbench.cli.cmd_verify", None, raising=False)

    def boom(args):
        raise cls("fix the thing in params/x.yaml")

    import embbench.cli as cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, boom))
    assert main(["verify", "demo"]) == 2
    err = capsys.readouterr().err
    assert "fix the thing in params/x.yaml" in err and "Traceback" not in err


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser

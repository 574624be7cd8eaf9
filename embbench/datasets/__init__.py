"""The six public datasets, a user's own catalogues, and the demo, by name.

``create_catalogue("sop", "/data/Stanford_Online_Products")`` reads a dataset in the layout its
publisher ships and returns the same :class:`~embbench.catalogue.Catalogue` table as a user's
manifest, with splits ``train`` / ``val`` / ``test`` and the label columns of
``params/datasets.yaml`` (the one source of truth for defaults, protocols and published counts).

| name          | layout read                                    | default label    |
|---------------|------------------------------------------------|------------------|
| ``cars196``   | devkit (``cars_train/``...) or ``cars_annos.mat`` | ``class``      |
| ``sop``       | ``Ebay_train.txt`` / ``Ebay_test.txt``            | ``super_class_id`` |
| ``food2k``    | ``Food2k_label/*_finetune.txt``                   | ``food_id``      |
| ``rp2k``      | ``all/{train,test}/<category>/``                  | ``category``     |
| ``products10k`` | ``train.csv`` / ``test_kaggletest.csv``         | ``class``        |
| ``fashion``   | ``styles.csv`` + ``images/``                      | ``masterCategory`` |
| ``manifest``  | a CSV (``root`` = its path; options of ``from_manifest``) | ``label``  |
| ``folder``    | ``<split>/<label>/<image>`` or ``<label>/<image>`` | ``label``       |
| ``demo``, ``demo_b`` | generated (``embbench.demo``)               | ``product``      |

Where things live (timm's split): ``_registry`` (names, entries, a user's catalogues, defaults),
``_factory`` (``create_catalogue`` and its steps), ``_common`` (the :class:`LoadRequest` every
loader takes, layouts, seeded splits), one module per public dataset (each registers itself
when imported, below), ``custom`` (manifest, folder, demo). ``verify(name, root)`` checks a
local copy and says what to fix; ``fetch_urls`` downloads catalogues whose paths are URLs into
a content-addressed cache; :mod:`embbench.datasets.prepare` makes a dataset ready to score.
"""

from __future__ import annotations

from embbench._registry import UnknownNameError

# Importing the loader modules registers their datasets.
from embbench.datasets import cars, custom, fashion, food2k, products10k, rp2k, sop
from embbench.datasets._common import DatasetLayoutError, LoadRequest
from embbench.datasets._factory import (
    create_catalogue,
    drop_missing_files,
    resolve_root,
    with_label,
)
from embbench.datasets._params import DatasetInfo, DatasetParamsError, default_params_path
from embbench.datasets._registry import (
    DatasetEntry,
    catalogue_kind,
    get_dataset_info,
    list_datasets,
    register_catalogue,
    register_dataset,
    register_user_catalogues,
)
from embbench.datasets._texts import check_texts, detect_text_column
from embbench.datasets._verify import VerifyReport, verify, verify_main
from embbench.datasets.fetch import FetchError, FetchFailure, FetchReport, fetch_urls

__all__ = [
    "DatasetEntry",
    "DatasetInfo",
    "DatasetLayoutError",
    "DatasetParamsError",
    "FetchError",
    "FetchFailure",
    "FetchReport",
    "LoadRequest",
    "UnknownNameError",
    "VerifyReport",
    "cars",
    "catalogue_kind",
    "check_texts",
    "create_catalogue",
    "custom",
    "default_params_path",
    "detect_text_column",
    "drop_missing_files",
    "fashion",
    "fetch_urls",
    "food2k",
    "get_dataset_info",
    "list_datasets",
    "products10k",
    "register_catalogue",
    "register_dataset",
    "register_user_catalogues",
    "resolve_root",
    "rp2k",
    "sop",
    "verify",
    "verify_main",
    "with_label",
]

"""The reproducible results table: every hashing method at 16, 32 and 64 bits on the product
photos and on Fashion-MNIST, on the same frozen EfficientNet-Lite0 features, each trained to
convergence (early stopping on val) after a learning-rate choice on val, plus the paper's
ablations, SGML as a real-valued embedding and the naive L1 match.

    fashionhash table                                  # the full table
    fashionhash table --quick                          # smoke variant (CI), a few minutes
    fashionhash table --datasets kaggle --methods adversarial,dpsh --bits 64
    fashionhash table --readme docs/results.md         # also into the results page
    fashionhash table --headline README.md             # and its summary into the README

Resumable: a run with its ``metrics.json`` is not trained again, one killed mid-training
resumes from its last checkpoint (see :mod:`fashionhash.table.runs`). Every method of a
dataset reads the same ``split.json`` (written once into ``<runs>/<dataset>/``).

:func:`fashionhash.table.build.build_table` runs it; :mod:`~fashionhash.table.plan` says what
is run (importing it does not import torch, so the CLI's help stays fast).
"""

"""``python -m ecaseg.engine.dino_pretrain``: the ``ecaseg pretrain-dino`` command line (``ecaseg.cli``)."""

from __future__ import annotations

from ecaseg.cli import pretrain_dino_main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pretrain_dino_main())

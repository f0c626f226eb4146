"""The ``remat`` command. Thin: argument parsing and printing; the work is in
``remat.bench`` and ``remat.planner``. One module per command (``bench_command``,
``plan_command``), the parser (``parsing``) from the help texts (``help_texts``), and the
entry point (``app``).

rich and matplotlib are imported inside the functions that use them, so ``import remat``
stays light.
"""

from __future__ import annotations

from remat.cli.app import main
from remat.cli.help_texts import BENCH_EPILOG, FIT_EPILOG, MAIN_EPILOG, PLAN_EPILOG

__all__ = ["BENCH_EPILOG", "FIT_EPILOG", "MAIN_EPILOG", "PLAN_EPILOG", "main"]
